"""Dataset sources (shapes, imagefolder, save_to_disk, hub errors), resize + crops, and the rank-independent data
order (global permutation per epoch, rank slices, BERT masks, BatchLoader). Offline: every fixture is made here."""
import functools
import socket
import sys
import time

import numpy as np
import pytest
import torch

from igpt.data import (
    HELD_OUT_FRACTION,
    TEST_START,
    BatchLoader,
    DatasetUnavailableError,
    bert_mask_for,
    global_batch_indices,
    make_shapes,
    open_source,
    rank_slice,
    resize_crop,
    shapes_labels,
)

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

CLASSES = ["apple", "banana", "cherry"]
PER_CLASS = 6


def unique_image(c: int, i: int, size=(40, 30)) -> np.ndarray:
    """uint8 [H, W, 3]: a horizontal ramp in red (so crop positions show) and a (class, index) code in green/blue
    that survives any resize + crop (constant over the image)."""
    w, h = size
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = (np.arange(w) * 255 // (w - 1)).astype(np.uint8)[None, :]
    img[..., 1] = 40 * c + 10
    img[..., 2] = 10 * i + 5
    return img


def code(images: torch.Tensor) -> list[tuple[int, int]]:
    """(green, blue) of each image: which fixture image it came from."""
    return [(int(x[0, 0, 1]), int(x[0, 0, 2])) for x in images]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def imagefolder(tmp):
    root = tmp / "folder"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(unique_image(c, i)).save(root / name / f"{i}.png")
    return root


def _dataset(n_per_class: int, offset: int = 0, label_feature=None):
    feats = datasets.Features({"image": datasets.Image(),
                               "label": label_feature or datasets.ClassLabel(names=CLASSES)})
    rows = [(c, i) for c in range(len(CLASSES)) for i in range(offset, offset + n_per_class)]
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(unique_image(c, i, size=(30, 40))) for c, i in rows],
         "label": [c for c, _ in rows]}, features=feats)


@pytest.fixture(scope="module")
def saved_dict(tmp):
    path = tmp / "saved_dict"
    datasets.DatasetDict({"train": _dataset(4), "test": _dataset(2, offset=10)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def saved_plain(tmp):
    """A bare Dataset (no splits), int labels in a column named 'labels' and no ClassLabel, an extra column."""
    ds = _dataset(5, label_feature=datasets.Value("int64")).rename_column("label", "labels")
    ds = ds.add_column("caption", [f"c{i}" for i in range(len(ds))])
    path = tmp / "saved_plain"
    ds.save_to_disk(str(path))
    return path


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


# ---------------------------------------------------------------------------------------------------------------
# shapes


def test_shapes_source_matches_make_shapes():
    train = open_source("shapes", "train", 16, seed=3, shapes_size=100)
    test = open_source("shapes", "test", 16, seed=3, shapes_size=100)
    assert len(train) == 100 and train.n_classes == 10 and len(train.class_names) == 10
    images, labels = train.get([5, 2, 3, 4, 99], train=True, epoch=7)
    ref, ref_labels = make_shapes(100, 16, seed=3)
    assert images.dtype == torch.uint8 and images.shape == (5, 16, 16, 3) and labels.dtype == torch.int64
    assert torch.equal(images, ref[[5, 2, 3, 4, 99]]) and torch.equal(labels, ref_labels[[5, 2, 3, 4, 99]])
    assert torch.equal(train.get([5], train=False)[0], images[:1])  # already R x R: crops are the identity
    t_images, _ = test.get([0, 1], train=False)
    assert torch.equal(t_images, make_shapes(2, 16, seed=3, start=TEST_START)[0])
    assert torch.equal(train.labels(), shapes_labels(100, seed=3))
    assert torch.equal(test.labels(), shapes_labels(100, seed=3, start=TEST_START))
    assert torch.equal(train.labels().bincount(minlength=10), torch.full((10,), 10))  # balanced
    with pytest.raises(IndexError):
        train.get([100], train=False)


# ---------------------------------------------------------------------------------------------------------------
# resize + crop


def test_area_resize_constant_and_2x_pattern():
    flat = np.full((30, 40, 3), (17, 200, 93), dtype=np.uint8)
    out = resize_crop(flat, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == np.array([17, 200, 93], dtype=np.uint8)).all()
    # 2x2 cells of (0, 100, 200, 60): an area downsample by 2 gives their mean, 90, everywhere (bilinear or
    # nearest would not)
    cell = np.array([[0, 100], [200, 60]], dtype=np.uint8)
    pattern = np.repeat(np.tile(cell, (16, 16))[..., None], 3, axis=2)
    assert (resize_crop(pattern, 16) == 90).all()
    gray = Image.fromarray(np.tile(cell, (16, 16)), mode="L")  # non-RGB input is converted
    assert (resize_crop(gray, 16) == 90).all()


def test_resize_keeps_aspect_and_crops_centre_or_at_u():
    ramp = np.repeat(np.repeat(np.arange(64, dtype=np.uint8)[None, :, None], 32, 0), 3, 2)  # 64 wide, 32 high
    centre = resize_crop(ramp, 16)  # -> 32 x 16 after the resize, columns 8..23 kept
    assert centre[0, :, 0].tolist() == [2 * j + 1 for j in range(8, 24)]  # column-pair means, x.5 rounded up
    left = resize_crop(ramp, 16, crop_u=(0.0, 0.5))
    right = resize_crop(ramp, 16, crop_u=(0.999, 0.5))
    assert left[0, 0, 0] == 1 and right[0, -1, 0] == 63  # the first and the last column pair


# ---------------------------------------------------------------------------------------------------------------
# imagefolder and save_to_disk


def test_imagefolder_carved_split_is_disjoint(imagefolder, cache):
    train = open_source(f"imagefolder:{imagefolder}", "train", 16, cache_dir=cache)
    test = open_source(f"imagefolder:{imagefolder}", "test", 16, cache_dir=cache)
    n = len(CLASSES) * PER_CLASS
    assert len(test) == max(1, round(HELD_OUT_FRACTION * n)) and len(train) + len(test) == n
    assert train.n_classes == 3 and train.class_names == CLASSES and "held-out" in repr(test)
    tr_images, tr_labels = train.get(range(len(train)), train=False)
    te_images, _ = test.get(range(len(test)), train=False)
    assert tr_images.shape == (len(train), 16, 16, 3) and tr_images.dtype == torch.uint8
    assert tr_labels.dtype == torch.int64 and torch.equal(tr_labels, train.labels())
    tr_codes, te_codes = code(tr_images), code(te_images)
    assert not set(tr_codes) & set(te_codes)  # disjoint, and together every image once
    assert sorted(tr_codes + te_codes) == sorted((40 * c + 10, 10 * i + 5) for c in range(3) for i in range(PER_CLASS))
    for (g, _), label in zip(tr_codes, tr_labels.tolist()):
        assert g == 40 * label + 10  # labels belong to their images


def test_imagefolder_with_split_folders(tmp_path, cache):
    for split, n in [("train", 3), ("test", 2)]:
        for c, name in enumerate(CLASSES[:2]):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(unique_image(c, i + 10 * (split == "test"))).save(tmp_path / split / name / f"{i}.png")
    train = open_source(f"imagefolder:{tmp_path}", "train", 8, cache_dir=cache)
    test = open_source(f"imagefolder:{tmp_path}", "test", 8, cache_dir=cache)
    assert (len(train), len(test)) == (6, 4) and train.n_classes == 2
    assert all(b >= 105 for _, b in code(test.get(range(4), train=False)[0]))


def test_save_to_disk_dataset_dict(saved_dict):
    train = open_source(str(saved_dict), "train", 12)
    test = open_source(str(saved_dict), "test", 12)
    assert (len(train), len(test)) == (12, 6) and test.n_classes == 3 and test.class_names == CLASSES
    images, labels = test.get([5, 0], train=False)
    assert images.shape == (2, 12, 12, 3) and labels.tolist() == [2, 0]
    assert code(images) == [(90, 10 * 11 + 5), (10, 10 * 10 + 5)]
    assert torch.equal(test.labels(), torch.tensor([0, 0, 1, 1, 2, 2]))


def test_save_to_disk_plain_dataset_and_validation_split(saved_plain, tmp_path):
    train = open_source(str(saved_plain), "train", 8)
    test = open_source(str(saved_plain), "test", 8)
    assert train.label_column == "labels" and train.n_classes == 3 and train.class_names is None
    assert len(train) + len(test) == 15 and len(test) == 1
    assert not set(code(train.get(range(len(train)), train=False)[0])) & set(code(test.get([0], train=False)[0]))
    unlabeled = open_source(str(saved_plain), "train", 8, label_column=None)  # auto-detection finds "labels"
    assert unlabeled.n_classes == 3
    path = tmp_path / "with_validation"
    datasets.DatasetDict({"train": _dataset(2), "validation": _dataset(1, offset=20)}).save_to_disk(str(path))
    val = open_source(str(path), "test", 8)
    assert len(val) == 3 and "validation" in repr(val) and len(open_source(str(path), "train", 8)) == 6


def test_no_label_column(tmp_path):
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(unique_image(0, i)) for i in range(4)]},
                                    features=datasets.Features({"img": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "nolabel"))
    src = open_source(str(tmp_path / "nolabel"), "train", 8)
    images, labels = src.get([0, 1], train=True)
    assert labels is None and src.labels() is None and src.n_classes is None and images.shape == (2, 8, 8, 3)


def test_crops_are_deterministic_per_seed_epoch_index(imagefolder, cache):
    src = open_source(f"imagefolder:{imagefolder}", "train", 16, seed=5, cache_dir=cache)
    idx = list(range(12))
    a, _ = src.get(idx, train=True, epoch=0)
    assert torch.equal(a, src.get(idx, train=True, epoch=0)[0])
    assert torch.equal(a[[7, 3]], src.get([7, 3], train=True, epoch=0)[0])  # per sample, not per batch position
    assert torch.equal(src.get(idx, train=False)[0], src.get(idx, train=False)[0])
    # 40 x 30 -> 21 x 16 after the resize: 6 horizontal crop positions; the red ramp tells them apart
    b, _ = src.get(idx, train=True, epoch=1)
    assert not torch.equal(a, b)
    other_seed = open_source(f"imagefolder:{imagefolder}", "train", 16, seed=6, cache_dir=cache)
    assert not torch.equal(a, other_seed.get(idx, train=True, epoch=0)[0])
    centre = src.get(idx, train=False)[0]
    assert not torch.equal(a, centre)
    assert code(a) == code(centre)  # crops move the window, never mix up images


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_errors(tmp_path, saved_dict, imagefolder, cache):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        open_source(f"imagefolder:{tmp_path / 'missing'}", "train", 16, cache_dir=cache)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no image files"):
        open_source(f"imagefolder:{tmp_path / 'empty'}", "train", 16, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=f"imagefolder:{imagefolder}"):
        open_source(str(imagefolder), "train", 16)  # a folder of images is not a save_to_disk directory
    with pytest.raises(ValueError, match=r"--image-column 'pixels' is not a column .*\['image', 'label'\]"):
        open_source(str(saved_dict), "train", 16, image_column="pixels")
    with pytest.raises(ValueError, match="--label-column 'y'"):
        open_source(str(saved_dict), "train", 16, label_column="y")
    ds = datasets.Dataset.from_dict({"pixels": [[1, 2, 3]], "label": [0]})
    ds.save_to_disk(str(tmp_path / "noimage"))
    with pytest.raises(ValueError, match=r"no image column .*\['pixels', 'label'\].*--image-column"):
        open_source(str(tmp_path / "noimage"), "train", 16)
    with pytest.raises(ValueError, match="resolution"):
        open_source(str(saved_dict), "train", 0)
    with pytest.raises(ValueError, match="split"):
        open_source("shapes", "val", 16)


def test_unreachable_hub_id_gives_a_local_copy_hint(monkeypatch, cache):
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    t0 = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as err:
        open_source("igpt-tests-made-up/no-such-dataset-3141", "train", 16, cache_dir=cache)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "could not be loaded from the Hugging Face Hub" in msg
    assert "--dataset imagefolder:DIR" in msg and "--dataset DIR" in msg
    assert isinstance(err.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------------
# data order


def test_every_epoch_is_a_permutation_and_epochs_differ():
    n, gb = 50, 8  # 6 batches per epoch, 2 samples dropped each epoch
    epochs = {}
    for step in range(18):
        idx, epoch = global_batch_indices(step, gb, n, seed=1)
        assert idx.dtype == torch.int64 and len(idx) == gb and epoch == step // 6
        epochs.setdefault(epoch, []).append(idx)
    for batches in epochs.values():
        seen = torch.cat(batches)
        assert len(seen.unique()) == 48 and seen.min() >= 0 and seen.max() < n  # no repeats within an epoch
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))
    assert torch.equal(global_batch_indices(7, gb, n, 1)[0], epochs[1][1])  # a pure function of its arguments
    assert not torch.equal(global_batch_indices(0, gb, n, 2)[0], epochs[0][0])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        global_batch_indices(0, 64, 50, 0)


def test_rank_slices_rebuild_the_global_batch():
    idx, _ = global_batch_indices(3, 16, 100, seed=0)
    for world in (1, 2, 4):
        assert torch.equal(torch.cat([rank_slice(idx, r, world) for r in range(world)]), idx)
    with pytest.raises(ValueError, match="divisible"):
        rank_slice(idx, 0, 3)
    with pytest.raises(ValueError):
        rank_slice(idx, 2, 2)


def test_bert_masks_do_not_depend_on_the_rank_count():
    idx, _ = global_batch_indices(2, 8, 40, seed=0)
    full = bert_mask_for(idx, step=2, seq_len=256, seed=9)
    assert full.dtype == torch.bool and full.shape == (8, 256)
    halves = torch.cat([bert_mask_for(rank_slice(idx, r, 2), 2, 256, 9) for r in range(2)])
    assert torch.equal(full, halves)
    assert abs(full.float().mean().item() - 0.15) < 0.03
    assert not torch.equal(full, bert_mask_for(idx, 3, 256, 9))  # new masks each step
    assert not torch.equal(full, bert_mask_for(idx, 2, 256, 10))
    assert not torch.equal(full[0], full[1])
    assert bert_mask_for(idx, 2, 256, 9, rate=0.0).sum() == 0 and bert_mask_for(idx, 2, 256, 9, rate=1.0).all()


def test_batch_loader_ranks_and_workers(saved_dict):
    src = open_source(str(saved_dict), "train", 8, seed=1)
    one = BatchLoader(src, 4, seed=2)
    ranks = [BatchLoader(src, 4, rank=r, world_size=2, seed=2) for r in range(2)]
    for step in (0, 2, 5):  # 3 steps per epoch: step 5 is in epoch 1
        images, labels, idx = one.batch(step)
        assert images.shape == (4, 8, 8, 3) and labels.shape == (4,)
        parts = [loader.batch(step) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)
        assert torch.equal(torch.cat([p[2] for p in parts]), idx)
    serial = list(one.iterate(1, 6))
    assert [s for s, *_ in serial] == [1, 2, 3, 4, 5]
    parallel = list(BatchLoader(src, 4, seed=2, num_workers=2).iterate(1, 6))
    assert [s for s, *_ in parallel] == [1, 2, 3, 4, 5]
    for a, b in zip(serial, parallel):
        assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    with pytest.raises(ValueError, match="divisible"):
        BatchLoader(src, 4, world_size=3)


def test_batch_loader_shapes_without_labels_path():
    src = open_source("shapes", "train", 8, seed=0, shapes_size=40)
    loader = BatchLoader(src, 8, world_size=2, rank=1, seed=4, train=False)
    step, images, labels, idx = next(loader.iterate(0, 1))
    ref, ref_labels = make_shapes(40, 8, seed=0)
    assert step == 0 and torch.equal(images, ref[idx]) and torch.equal(labels, ref_labels[idx])


# JPEG draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale (DCT scaling), never below twice the resized size. Its
# reduced IDCT is not an exact box average, so pixels move a little; measured on 64 generated ImageNet-sized JPEGs
# (bench/data.py's, 500 x 375, ~61 KiB, quality 90), centre and corner crops, uint8 after the resize: mean |diff|
# 1.45 (R 32), 0.95 (48), 1.10 (64); 99th percentile 9 / 6 / 7; max 34 / 27 / 39, single pixels at sharp edges.
DRAFT_MAX_ABS, DRAFT_MEAN_ABS, DRAFT_P99_ABS = 48, 2.0, 12


@functools.lru_cache(maxsize=1)
def _bench_data():
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    spec = importlib.util.spec_from_file_location("bench_data", bench / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench))  # bench/data.py imports its `common`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


def synthetic_jpeg(seed):
    return _bench_data().synthetic_jpeg(seed)


@pytest.mark.parametrize("resolution", [32, 64])
def test_jpeg_draft_stays_within_its_tolerance_and_crops_the_same_region(tmp_path, cache, resolution):
    (tmp_path / "images" / "c").mkdir(parents=True)
    for i in range(6):
        (tmp_path / "images" / "c" / f"{i}.jpg").write_bytes(synthetic_jpeg(i))
    spec = f"imagefolder:{tmp_path / 'images'}"
    full = open_source(spec, "train", resolution, cache_dir=cache, jpeg_draft=False)
    drafted = open_source(spec, "train", resolution, cache_dir=cache)  # the default
    for train in (False, True):  # centre crops, and random crops at the same offsets
        a = full.get(range(len(full)), train=train)[0].int()
        b = drafted.get(range(len(full)), train=train)[0].int()
        diff = (a - b).abs().float()
        assert 0 < diff.max() <= DRAFT_MAX_ABS  # > 0: the draft really decoded at a reduced scale
        assert diff.mean() <= DRAFT_MEAN_ABS and diff.quantile(0.99) <= DRAFT_P99_ABS


def test_jpeg_draft_keeps_the_crop_region_of_a_sharp_pattern():
    """Left half black, right half white: a crop taken from the wrong place (a decoded size not mapped back to the
    original's) would move the edge by whole output pixels."""
    import io

    img = np.zeros((375, 500, 3), np.uint8)
    img[:, 250:] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    for u in (None, (0.0, 0.0), (0.5, 0.5), (0.99, 0.99)):
        full = resize_crop(Image.open(io.BytesIO(buf.getvalue())), 32, u, jpeg_draft=False).astype(int)
        drafted = resize_crop(Image.open(io.BytesIO(buf.getvalue())), 32, u).astype(int)
        assert np.abs(full - drafted).max() <= 8, u
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")  # draft mode is for JPEGs only: other formats decode as before
    assert Image.open(io.BytesIO(png.getvalue())).draft("RGB", (64, 64)) is None


def test_both_resizes_turn_an_exif_rotated_photo_upright(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) comes out upright."""
    from PIL import Image

    from igpt.sources import resize_hf

    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:20] = 255  # white top half, black bottom half, as viewed
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    for out in (resize_crop({"path": str(tmp_path / "photo.jpg"), "bytes": None}, 8),
                resize_hf({"path": str(tmp_path / "photo.jpg"), "bytes": None}, 8)):
        assert out[0].mean() > 200 and out[-1].mean() < 55, out[..., 0]
