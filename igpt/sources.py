"""Dataset sources: one split of "shapes" | "imagefolder:DIR" | a save_to_disk DIR | a Hugging Face Hub id, indexed
lazily (`open_source(...).get(indices)` decodes only the images asked for), with the image pipeline: RGB -> area
resize (shorter side = R) -> R x R crop (random for training, centre for evaluation).

Every random choice here (crop offsets, the held-out slice) comes from a counter-based hash of integers
(igpt.hashing), so any batch can be rebuilt after a resume, by any number of ranks. Hugging Face `datasets` is
imported lazily (only by open_source, for the sources other than shapes).
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch

from igpt.hashing import STREAM_CROP, STREAM_HELD_OUT, as_index_array, check_int, hash_uniform, key
from igpt.shapes import N_CLASSES, SHAPES_CLASSES, TEST_START, make_shapes, shapes_labels

HELD_OUT_FRACTION = 0.05  # share of a train-only dataset carved out as its test split (at least 1 image)
_HELD_OUT_KEY = 0x5EED    # the carve does not depend on the run's seed: every run and the probe see the same split
_LABEL_NAMES = ("label", "labels", "fine_label")
_LOCAL_HINT = ("to use a local copy pass --dataset imagefolder:DIR (folders of images per class) "
               "or --dataset DIR (a datasets.save_to_disk directory)")


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is missing, unreachable or not in a format we read; the message says how to point at a local
    copy."""


# ----------------------------------------------------------------------------------------------------------------
# image pipeline: RGB -> area resize (shorter side = R) -> R x R crop (random for training, centre for evaluation)


def _to_pil(x):
    from PIL import Image

    if isinstance(x, Image.Image):
        return x
    if isinstance(x, dict) and (x.get("bytes") is not None or x.get("path")):  # an undecoded datasets.Image value
        return Image.open(io.BytesIO(x["bytes"])) if x.get("bytes") is not None else Image.open(x["path"])
    if isinstance(x, (np.ndarray, torch.Tensor)):
        arr = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise TypeError(f"image arrays must be uint8 [H, W], [H, W, 1|3|4], got {arr.dtype} {arr.shape}")
        return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    raise TypeError(f"cannot read an image from a {type(x).__name__}; the image column must hold images "
                    "(datasets.Image) or uint8 arrays")


def _upright(img):
    """(img turned upright by its EXIF orientation, as datasets' own decoder does; whether it was turned)."""
    from PIL import ImageOps

    if img.getexif().get(0x0112, 1) == 1:
        return img, False
    return ImageOps.exif_transpose(img), True


def _resized_size(w: int, h: int, R: int) -> tuple[int, int]:
    """The size after the area resize: shorter side R, the other keeps the aspect ratio."""
    return (R, max(R, round(h * R / w))) if w <= h else (max(R, round(w * R / h)), R)


def resize_crop(image, resolution: int, crop_u: tuple[float, float] | None = None, *,
                jpeg_draft: bool = True) -> np.ndarray:
    """One image (PIL image, uint8 array, or an undecoded datasets.Image value) -> uint8 [R, R, 3] RGB.

    The shorter side is resized to R with area (box) interpolation - every output pixel is the average of the input
    area it covers, so downsampling is antialiased (upsampling repeats pixels); the other side keeps the aspect ratio.
    Then an R x R crop: centred when crop_u is None, else at fraction crop_u = (u_x, u_y) in [0, 1) of the free range.
    jpeg_draft: a JPEG not decoded yet is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (DCT scaling, PIL's draft),
    never below twice the resized size, then box-resized from the exact extent of the original (docs/DESIGN.md, Data).
    """
    from PIL import Image

    img = _to_pil(image)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image of size {w}x{h}")
    R = resolution
    extent = None  # the whole original image, in the decoded image's pixels
    img, turned = _upright(img)
    if turned:
        w, h = img.size
    elif jpeg_draft and img.format == "JPEG":
        drafted = img.draft("RGB", tuple(2 * s for s in _resized_size(w, h, R)))
        extent = drafted[1] if drafted else None
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else img.mode).convert("RGB")
    nw, nh = _resized_size(w, h, R)
    if (nw, nh) != img.size:  # a drafted image maps onto the same (nw, nh) grid: the crop below is the same region
        img = img.resize((nw, nh), Image.Resampling.BOX, box=extent)
    if crop_u is None:
        ox, oy = (nw - R) // 2, (nh - R) // 2
    else:
        ox = min(int(crop_u[0] * (nw - R + 1)), nw - R)
        oy = min(int(crop_u[1] * (nh - R + 1)), nh - R)
    if (nw, nh) != (R, R):
        img = img.crop((ox, oy, ox + R, oy + R))
    return np.array(img, dtype=np.uint8).reshape(R, R, 3)


def resize_hf(image, resolution: int) -> np.ndarray:
    """One image -> uint8 [R, R, 3] RGB the way HF's ImageGPTImageProcessor resizes: the whole image to R x R with
    PIL bilinear (the aspect ratio is not kept, nothing is cropped), as the released iGPT models were evaluated."""
    from PIL import Image

    img, _ = _upright(_to_pil(image))  # as datasets' decoder hands it to the processor
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else img.mode).convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8).reshape(resolution, resolution, 3)


RESIZES = {"box": resize_crop, "hf": resize_hf}  # --resize: ours (box + crop) or the HF processor's


# ----------------------------------------------------------------------------------------------------------------
# sources


class ImageSource:
    """A split of an image dataset, indexed lazily: `get(indices)` decodes only the images asked for.

    name: the --dataset spec; split: "train" | "test"; resolution: R; n_classes: number of classes, None without
    a label column; class_names: list of names where the dataset has them, else None.
    """

    name: str
    split: str
    resolution: int
    n_classes: int | None
    class_names: list[str] | None = None
    seed: int = 0
    note: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: Sequence[int], *, train: bool, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [n, R, R, 3] RGB and int64 labels [n] (or None). train=True: random crops drawn from
        (seed, epoch, sample index); train=False: centre crops."""
        idx = as_index_array(indices)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must lie in 0..{len(self) - 1} for {self!r}, "
                             f"got values in {idx.min()}..{idx.max()}")
        crop_u = hash_uniform(key(STREAM_CROP, self.seed, epoch), idx, 2) if train else None
        return self._get(idx, crop_u)

    def _get(self, idx: np.ndarray, crop_u: np.ndarray | None):
        raise NotImplementedError

    def labels(self) -> torch.Tensor | None:
        """int64 [len(self)]: every label of the split (None without a label column)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        note = f", {self.note}" if self.note else ""
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"resolution={self.resolution}, n_classes={self.n_classes}{note})")


class ShapesSource(ImageSource):
    """The embedded shapes dataset: image i of the train split is make_shapes index i, of the test split
    TEST_START + i. Rendered on demand at the resolution (no crop needed; `train` changes nothing)."""

    def __init__(self, split: str, resolution: int, *, seed: int = 0, size: int = 1 << 20):
        if resolution < 8:
            raise ValueError(f"the shapes dataset renders at resolution >= 8, got {resolution}")
        size = check_int("shapes_size", size, 1)
        if size > TEST_START:
            raise ValueError(f"shapes_size must be <= {TEST_START} so train and test stay disjoint, got {size}")
        self.name, self.split, self.resolution, self.seed, self.size = "shapes", split, resolution, seed, size
        self.n_classes, self.class_names = N_CLASSES, list(SHAPES_CLASSES)
        self.start = 0 if split == "train" else TEST_START
        self.note = f"seed={seed}, indices {self.start}..{self.start + size - 1}"
        self._labels = None

    def __len__(self) -> int:
        return self.size

    def _get(self, idx, crop_u):
        R = self.resolution
        images = torch.empty(len(idx), R, R, 3, dtype=torch.uint8)
        labels = torch.empty(len(idx), dtype=torch.int64)
        i = 0
        while i < len(idx):  # render runs of consecutive indices together
            j = i + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            images[i:j], labels[i:j] = make_shapes(j - i, R, self.seed, self.start + int(idx[i]))
            i = j
        return images, labels

    def labels(self) -> torch.Tensor:
        if self._labels is None:
            self._labels = shapes_labels(self.size, self.seed, self.start)
        return self._labels


class HFSource(ImageSource):
    """A split of a Hugging Face `datasets.Dataset`; rows are decoded on demand (in DataLoader workers when used
    through BatchLoader). `rows` maps source index -> dataset row (None: identity), for carved splits."""

    def __init__(self, name: str, split: str, resolution: int, dataset, *, seed: int = 0, image_column: str,
                 label_column: str | None, n_classes: int | None, class_names: list[str] | None,
                 rows: np.ndarray | None = None, note: str = "", jpeg_draft: bool = True,
                 resize: str = "box"):
        import datasets

        self.name, self.split, self.resolution, self.seed = name, split, resolution, seed
        self.resize = resize
        self.image_column, self.label_column = image_column, label_column
        self.n_classes, self.class_names, self.rows, self.note = n_classes, class_names, rows, note
        self.jpeg_draft = jpeg_draft
        self.dataset = dataset.select_columns([image_column] + ([label_column] if label_column else []))
        feature = self.dataset.features[image_column]
        if jpeg_draft and isinstance(feature, datasets.Image) and feature.decode:
            # rows as bytes or paths: resize_crop opens them itself, so that libjpeg can decode JPEGs scaled down
            self.dataset = self.dataset.cast_column(image_column, datasets.Image(decode=False))
        self._decode = datasets.Image().decode_example  # undecoded values PIL cannot open itself (a remote path)

    def __len__(self) -> int:
        return len(self.dataset) if self.rows is None else len(self.rows)

    def _get(self, idx, crop_u):
        R = self.resolution
        images = torch.empty(len(idx), R, R, 3, dtype=torch.uint8)
        if len(idx) == 0:
            return images, (torch.zeros(0, dtype=torch.int64) if self.label_column else None)
        rows = idx if self.rows is None else self.rows[idx]
        batch = self.dataset[[int(r) for r in rows]]
        for k, image in enumerate(batch[self.image_column]):
            if isinstance(image, dict) and image.get("bytes") is None and not os.path.isfile(image.get("path") or ""):
                image = self._decode(image)
            if self.resize == "hf":  # the whole image: no crop to draw
                images[k] = torch.from_numpy(resize_hf(image, R))
                continue
            u = None if crop_u is None else (float(crop_u[k, 0]), float(crop_u[k, 1]))
            images[k] = torch.from_numpy(resize_crop(image, R, u, jpeg_draft=self.jpeg_draft))
        labels = None
        if self.label_column:
            labels = torch.tensor([int(v) for v in batch[self.label_column]], dtype=torch.int64).view(len(idx))
        return images, labels

    def labels(self) -> torch.Tensor | None:
        if not self.label_column:
            return None
        col = _column_numpy(self.dataset, self.label_column)
        return torch.from_numpy((col if self.rows is None else col[self.rows]).astype(np.int64))


def _column_numpy(ds, column: str) -> np.ndarray:
    """One column of a datasets.Dataset as a numpy array, read through Arrow (no Python objects per row)."""
    return np.asarray(ds.select_columns([column]).with_format("numpy")[:][column])


def _detect_columns(features, name: str, image_column, label_column):
    import datasets

    cols = list(features)
    for flag, column in (("--image-column", image_column), ("--label-column", label_column)):
        if column is not None and column not in features:
            raise ValueError(f"{flag} {column!r} is not a column of {name} (columns: {cols})")
    if image_column is None:
        image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            raise ValueError(f"{name} has no image column (a datasets.Image feature) among its columns {cols}; "
                             "name the column that holds the images with --image-column COLUMN")
    if label_column is None:
        label_column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        if label_column is None:
            label_column = next((c for c in _LABEL_NAMES if isinstance(features.get(c), datasets.Value)
                                 and features[c].dtype.startswith(("int", "uint"))), None)
    return image_column, label_column


def _held_out_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic pseudo-random held-out slice of rows 0..n-1 (HELD_OUT_FRACTION, at least 1): (train, test),
    both sorted. Random rather than the last rows: datasets are often sorted by class (imagefolder is)."""
    if n < 2:
        raise ValueError(f"the dataset has {n} image(s) and no test or validation split: at least 2 are needed to "
                         "hold one out for testing")
    k = max(1, round(HELD_OUT_FRACTION * n))
    u = hash_uniform(key(STREAM_HELD_OUT, _HELD_OUT_KEY), np.arange(n), 1)[:, 0]
    test = np.sort(np.argpartition(u, k - 1)[:k]) if k < n else np.arange(n)
    keep = np.ones(n, dtype=bool)
    keep[test] = False
    return np.nonzero(keep)[0].astype(np.int64), test.astype(np.int64)


def _hf_source(name: str, dsdict: dict, split: str, resolution: int, seed: int, image_column, label_column,
               jpeg_draft: bool = True, resize: str = "box"):
    """Pick the split of a {split name: Dataset} dict (test -> validation -> carved from train) and wrap it."""
    import datasets

    names = list(dsdict)
    if not names:
        raise DatasetUnavailableError(f"{name} holds no split; {_LOCAL_HINT}")
    only = names[0] if len(names) == 1 and names[0] not in ("test", "validation") else None
    train_name = "train" if "train" in dsdict else only  # a lone split of another name counts as train
    test_name = next((s for s in ("test", "validation") if s in dsdict), None)
    base = train_name if split == "train" or test_name is None else test_name
    if base is None:
        wanted = "'train'" if split == "train" else "'test', 'validation' or 'train'"
        raise ValueError(f"{name} has no {wanted} split (its splits: {names})")
    ds = dsdict[base]
    image_column, label_column = _detect_columns(ds.features, name, image_column, label_column)
    rows, note = None, ""
    if test_name is None:  # carve a fixed held-out slice out of the train split
        train_rows, test_rows = _held_out_rows(len(ds))
        rows = train_rows if split == "train" else test_rows
        note = (f"'{base}' split minus a held-out {HELD_OUT_FRACTION:.0%}" if split == "train" else
                f"held-out {HELD_OUT_FRACTION:.0%} of the '{base}' split") + " (no test or validation split)"
    elif split == "test" and test_name != "test":
        note = f"'{test_name}' split (no test split)"
    n_classes = class_names = None
    if label_column:
        feat = ds.features[label_column]
        if isinstance(feat, datasets.ClassLabel):
            n_classes, class_names = feat.num_classes, list(feat.names)
        else:  # plain ints: the largest label over every split + 1
            top = [int(_column_numpy(d, label_column).max()) for d in dsdict.values()
                   if len(d) and label_column in d.features]
            n_classes = max(top) + 1 if top else None
    return HFSource(name, split, resolution, ds, seed=seed, image_column=image_column, label_column=label_column,
                    n_classes=n_classes, class_names=class_names, rows=rows, note=note, jpeg_draft=jpeg_draft,
                    resize=resize)


def _has_image_file(root: str) -> bool:
    from PIL import Image

    Image.init()
    exts = {e.lower() for e in Image.registered_extensions()}
    for _, _, files in os.walk(root):
        if any(os.path.splitext(f)[1].lower() in exts for f in files):
            return True
    return False


def open_source(spec: str, split: str, resolution: int, *, seed: int = 0, image_column: str | None = None,
                label_column: str | None = None, shapes_size: int = 1 << 20,
                cache_dir: str | None = None, jpeg_draft: bool = True, resize: str = "box") -> ImageSource:
    """Open one split of a dataset.

    spec: "shapes" (embedded, no download) | "imagefolder:DIR" (DIR/CLASS/*.png, optionally under DIR/train, DIR/test)
    | DIR (a datasets.save_to_disk directory: DatasetDict or Dataset) | a Hugging Face Hub id.
    split: "train" | "test"; a dataset without a test split uses "validation", else a fixed held-out 5% of train
    (disjoint from what split="train" then returns; see repr). seed: the shapes dataset's seed and the random-crop
    seed. shapes_size: images in each shapes split. cache_dir: the datasets cache (imagefolder and hub ids).
    jpeg_draft: decode JPEGs at a reduced scale (see resize_crop); False decodes every image at full size.
    resize: "box" (shorter side, box filter, then a crop) or "hf" (the whole image, PIL bilinear, as HF's
    ImageGPTImageProcessor); shapes renders at the resolution and ignores it.
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {sorted(RESIZES)}, got {resize!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    resolution = check_int("resolution", resolution, 1)
    seed = check_int("seed", seed, 0)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset must be 'shapes', 'imagefolder:DIR', a directory or a hub id, got {spec!r}")
    if spec == "shapes":
        return ShapesSource(split, resolution, seed=seed, size=shapes_size)

    import datasets

    if spec.startswith("imagefolder:"):
        root = os.path.expanduser(spec[len("imagefolder:"):])
        if not os.path.isdir(root):
            raise DatasetUnavailableError(f"--dataset {spec}: no such directory {root!r}; imagefolder:DIR expects "
                                          "DIR/CLASS/IMAGE files (optionally under DIR/train and DIR/test)")
        if not _has_image_file(root):
            raise DatasetUnavailableError(f"--dataset {spec}: {root!r} contains no image files; imagefolder:DIR "
                                          "expects DIR/CLASS/IMAGE files (optionally under DIR/train and DIR/test)")
        try:
            dsdict = datasets.load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
        except Exception as e:
            raise DatasetUnavailableError(f"--dataset {spec}: the image folder could not be read "
                                          f"({type(e).__name__}: {e})") from e
        return _hf_source(spec, dict(dsdict), split, resolution, seed, image_column, label_column,
                          jpeg_draft, resize)

    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DatasetUnavailableError(
                f"--dataset {spec}: {path!r} is not a datasets.save_to_disk directory (no dataset_dict.json or "
                f"dataset_info.json/state.json); for folders of images per class pass --dataset imagefolder:{spec}"
            ) from e
        dsdict = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return _hf_source(spec, dsdict, split, resolution, seed, image_column, label_column, jpeg_draft, resize)
    if os.path.exists(path):
        raise DatasetUnavailableError(f"--dataset {spec}: {path!r} is a file, not a directory; {_LOCAL_HINT}")

    try:
        dsdict = datasets.load_dataset(spec, cache_dir=cache_dir)
    except Exception as e:  # offline, unreachable, not found, gated, ...: one clear message
        raise DatasetUnavailableError(f"dataset {spec!r} could not be loaded from the Hugging Face Hub "
                                      f"({type(e).__name__}: {e}); {_LOCAL_HINT}") from e
    return _hf_source(spec, dict(dsdict), split, resolution, seed, image_column, label_column, jpeg_draft, resize)
