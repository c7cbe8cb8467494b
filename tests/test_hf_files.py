"""Released Hugging Face ImageGPT files through every command: transformers directories and hub ids as
`--checkpoint`, `python -m igpt.convert`, the processor's quantisation and resize. Offline: random tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from test_convert import fill_random, hf_config, ids  # noqa: E402
from transformers import ImageGPTForCausalImageModeling, ImageGPTForImageClassification  # noqa: E402

from igpt import Decoder, FusedDecoder, Palette  # noqa: E402
from igpt.convert import hf_input_ids, image_processor_class, main as convert_main  # noqa: E402
from igpt.files import WeightsUnavailableError  # noqa: E402
from igpt.shapes import make_shapes  # noqa: E402
from igpt.sources import open_source, resize_crop, resize_hf  # noqa: E402

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
R = 8  # 8x8 images: n_positions 64


def random_clusters(seed=0, k=512):
    return np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)


def save_hf_dir(path, model, clusters=None, **save_kw):
    model.save_pretrained(path, **save_kw)
    if clusters is not None:
        image_processor_class()(clusters=clusters, size={"height": R, "width": R}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_causal():
    return fill_random(ImageGPTForCausalImageModeling(hf_config(n_positions=R * R)), seed=3)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, hf_causal):
    return save_hf_dir(tmp_path_factory.mktemp("hf") / "causal", hf_causal, random_clusters())


def assert_same_logits(model, hf, x):
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf(hf_input_ids(x)).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# from_pretrained: transformers directories, hub ids, missing paths


@pytest.mark.parametrize("cls", [Decoder, FusedDecoder])
def test_from_pretrained_reads_a_transformers_dir(causal_dir, hf_causal, cls):
    model = cls.from_pretrained(causal_dir)
    assert type(model) is cls and model.cfg.resolution == R and model.cfg.n_classes is None
    assert_same_logits(model, hf_causal, ids(R * R))
    assert torch.equal(model.palette.centres, torch.from_numpy(random_clusters()))


def test_from_pretrained_reads_the_classification_variant(tmp_path):
    hf = fill_random(ImageGPTForImageClassification(hf_config(n_positions=R * R, num_labels=3)), seed=4)
    model = Decoder.from_pretrained(save_hf_dir(tmp_path / "clf", hf, random_clusters(1))).eval()
    assert model.cfg.n_classes == 3
    x = ids(R * R)
    with torch.no_grad():
        torch.testing.assert_close(model(x, return_classes=True).class_logits, hf(hf_input_ids(x)).logits,
                                   rtol=0, atol=1e-5)
    assert torch.equal(model.palette.centres, torch.from_numpy(random_clusters(1)))


def test_safetensors_is_preferred_and_a_lone_bin_still_loads(tmp_path, causal_dir, hf_causal):
    both = tmp_path / "both"
    both.mkdir()
    for f in causal_dir.iterdir():
        (both / f.name).write_bytes(f.read_bytes())
    (both / "pytorch_model.bin").write_bytes(b"not a pickle: never read while model.safetensors is there")
    assert_same_logits(Decoder.from_pretrained(both), hf_causal, ids(R * R))
    only_bin = tmp_path / "bin"  # what older transformers wrote (transformers 5 writes safetensors only)
    hf_causal.config.save_pretrained(only_bin)
    torch.save(hf_causal.state_dict(), only_bin / "pytorch_model.bin")
    model = Decoder.from_pretrained(only_bin)
    assert_same_logits(model, hf_causal, ids(R * R))
    assert model.palette is None  # no preprocessor_config.json
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        from igpt.sample import load_checkpoint
        load_checkpoint(only_bin)


def test_missing_paths_say_they_do_not_exist(tmp_path):
    for missing in (tmp_path / "nowhere", str(tmp_path / "nowhere"), "runs-typo/nowhere.safetensors",
                    str(tmp_path / "w.safetensors")):
        with pytest.raises(FileNotFoundError, match="does not exist") as e:
            Decoder.from_pretrained(missing)
        assert not isinstance(e.value, WeightsUnavailableError), missing  # never sent to the hub


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_unfetchable_hub_id_fails_fast_with_one_clear_error(tmp_path, env):
    code = ("import time; from igpt import Decoder\n"
            "t = time.time()\n"
            "try:\n    Decoder.from_pretrained('openai/imagegpt-small')\n"
            "except Exception as e:\n    print(type(e).__name__, time.time() - t); print(e)\n")
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    full_env.update(HF_HOME=str(tmp_path / "hf-home"), **env)  # an empty cache: nothing to fall back on
    out = subprocess.run([sys.executable, "-c", code], env=full_env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    name, seconds = lines[0].split()
    assert name == "WeightsUnavailableError" and float(seconds) < 10, lines
    assert "'openai/imagegpt-small'" in lines[1] and "could not be fetched" in lines[1]
    assert "python -m igpt.convert --from-hf" in lines[1] and "save_pretrained" in lines[1]


# ----------------------------------------------------------------------------------------------------------------------
# python -m igpt.convert


def test_convert_from_hf_and_back(tmp_path, causal_dir, hf_causal):
    run = tmp_path / "run"
    convert_main(["--from-hf", str(causal_dir), "--out", str(run)])
    assert {"model.safetensors", "config.json", "palette.npy"} <= {f.name for f in run.iterdir()}
    ours = Decoder.from_pretrained(run)
    assert_same_logits(ours, hf_causal, ids(R * R))
    assert torch.equal(ours.palette.centres, torch.from_numpy(random_clusters()))

    back = tmp_path / "hf"
    convert_main(["--to-hf", str(run), "--out", str(back)])
    hf2 = ImageGPTForCausalImageModeling.from_pretrained(back).eval()
    assert_same_logits(ours, hf2, ids(R * R, seed=1))
    processor = transformers.AutoImageProcessor.from_pretrained(back)
    assert torch.equal(torch.as_tensor(np.asarray(processor.clusters), dtype=torch.float32), ours.palette.centres)
    assert processor.size["height"] == processor.size["width"] == R


def test_convert_to_hf_writes_the_classification_model(tmp_path):
    hf = fill_random(ImageGPTForImageClassification(hf_config(n_positions=R * R, num_labels=5)), seed=5)
    run = tmp_path / "run"
    convert_main(["--from-hf", str(save_hf_dir(tmp_path / "clf", hf, random_clusters(2))), "--out", str(run)])
    convert_main(["--to-hf", str(run), "--out", str(tmp_path / "back")])
    hf2 = ImageGPTForImageClassification.from_pretrained(tmp_path / "back").eval()
    x = ids(R * R)
    with torch.no_grad():
        torch.testing.assert_close(hf2(hf_input_ids(x)).logits, hf(hf_input_ids(x)).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# every command takes a transformers directory


def class_folder(root: Path) -> Path:
    for label, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (12, 10), (colour[0], colour[1] + 2 * i, colour[2])).save(root / label / f"{i}.png")
    return root


def test_probe_and_sample_take_a_transformers_dir(tmp_path, causal_dir):
    from igpt.probe import main as probe_main
    from igpt.sample import main as sample_main

    folder = class_folder(tmp_path / "folder")
    out = tmp_path / "probe"
    result = probe_main(["--checkpoint", str(causal_dir), "--dataset", f"imagefolder:{folder}", "--n-train", "16",
                         "--n-test", "4", "--precision", "fp32", "--no-cache", "--resize", "hf", "--out", str(out)])
    saved = json.loads((out / "probe.json").read_text())
    assert saved["best_layer"] == result["best_layer"] and len(saved["layers"]) == 3
    assert (out / "probe.png").exists()
    # completions of the folder's held-out image: rows are prompt, completions, original; --no-cache: the same PNG
    from test_cli import grid_tiles

    args = ["--checkpoint", str(causal_dir), "--prompt-dataset", f"imagefolder:{folder}", "--prompts", "1", "--n", "3"]
    sample_main([*args, "--out", str(tmp_path / "grid.png")])
    tiles = grid_tiles(tmp_path / "grid.png", R)
    assert tiles.shape[:2] == (1, 1 + 3 + 1)
    assert all(torch.equal(c[:R // 2], tiles[0, -1, :R // 2]) for c in tiles[0, 1:-1])  # the given half is kept
    sample_main([*args, "--out", str(tmp_path / "uncached.png"), "--no-cache"])
    assert (tmp_path / "uncached.png").read_bytes() == (tmp_path / "grid.png").read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing parity with ImageGPTImageProcessor


def gradient_images(n, size, seed=0):
    """Smooth colour gradients plus noise: what photos look like to a 512-colour palette."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        a, b, c = g.uniform(0, 255, (3, 3))
        img = a * xx[..., None] + b * yy[..., None] + c * (1 - xx[..., None]) * yy[..., None]
        out.append(np.clip(img / 2 + g.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def grid_clusters():
    """512 centres on an 8x8x8 grid of pixel levels 0, 36, ..., 252: pixels at the midpoints are exact ties."""
    levels = np.arange(8) * 36 / 127.5 - 1
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)


def quantize_mismatches(clusters, images):
    """(pixel indices where Palette.quantize and the processor disagree, the float64 distance gap there)."""
    processor = image_processor_class()(clusters=clusters, do_resize=False)
    theirs = np.concatenate([np.stack(processor(list(images[s:s + 20]), return_tensors="np")["input_ids"])
                             for s in range(0, len(images), 20)]).reshape(-1)
    ours = Palette.from_hf(clusters).quantize(torch.from_numpy(images)).reshape(-1).numpy()
    mismatch = np.nonzero(ours != theirs)[0]
    x = images.reshape(-1, 3)[mismatch].astype(np.float64) / 127.5 - 1
    c = clusters.astype(np.float64)
    gap = ((x - c[ours[mismatch]]) ** 2).sum(-1) - ((x - c[theirs[mismatch]]) ** 2).sum(-1)
    return mismatch, gap


def test_palette_quantize_matches_the_processor_except_at_ties():
    rng = np.random.default_rng(0)
    images = np.concatenate([rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),  # 102400 random pixels
                             gradient_images(8, 32), make_shapes(16, 32, seed=0)[0].numpy()])
    n_pixels = images.size // 3
    assert n_pixels >= 100_000
    mismatch, gap = quantize_mismatches(random_clusters(7), images)
    # a mismatch must be a tie: both centres equally far from the pixel in float64, up to fp32 rounding
    assert np.all(np.abs(gap) <= 1e-5), np.abs(gap).max()
    assert len(mismatch) <= n_pixels * 1e-3  # ties are rare: a real disagreement would show up in bulk
    print(f"random palette: {len(mismatch)} of {n_pixels} pixels differ, all at ties within 1e-5")

    # a palette full of exact ties: the processor's a^2 - 2ab + b^2 breaks them by rounding noise, we by index
    values = np.arange(0, 253, 18, dtype=np.uint8)  # grid levels and the midpoints between them
    tie_images = rng.choice(values, (20, 32, 32, 3))
    mismatch, gap = quantize_mismatches(grid_clusters(), tie_images)
    assert len(mismatch) > 0 and np.all(np.abs(gap) <= 1e-5), np.abs(gap).max()
    print(f"tie palette: {len(mismatch)} of {tie_images.size // 3} pixels differ, all at ties within 1e-5")


def test_resize_hf_is_the_processors_resize():
    rng = np.random.default_rng(1)
    processor = image_processor_class()(do_color_quantize=False, do_rescale=False, do_normalize=False,
                                          size={"height": 32, "width": 32})
    for shape in ((40, 30), (17, 64), (32, 32), (5, 7)):
        img = np.clip(gradient_images(1, max(shape), seed=shape[0])[0][:shape[0], :shape[1]]
                      + rng.integers(0, 20, (*shape, 3)), 0, 255).astype(np.uint8)
        ref = np.asarray(processor(img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
        np.testing.assert_array_equal(resize_hf(img, 32), ref.round().astype(np.uint8))
    wide = gradient_images(1, 64)[0][:20]  # 20 x 64: HF squeezes the whole image, ours crops the centre
    assert not np.array_equal(resize_hf(wide, 16), resize_crop(wide, 16))


def test_open_source_resize_hf(tmp_path):
    folder = class_folder(tmp_path / "folder")
    box = open_source(f"imagefolder:{folder}", "train", 8, cache_dir=str(tmp_path / "cache"))
    hf = open_source(f"imagefolder:{folder}", "train", 8, cache_dir=str(tmp_path / "cache"), resize="hf")
    row = int(hf.rows[0]) if hf.rows is not None else 0
    raw = hf.dataset[row][hf.image_column]
    assert torch.equal(hf.get([0], train=True)[0][0], torch.from_numpy(resize_hf(raw, 8)))
    assert torch.equal(box.get([0], train=False)[0][0], torch.from_numpy(resize_crop(raw, 8)))
    with pytest.raises(ValueError, match="resize must be one of"):
        open_source(f"imagefolder:{folder}", "train", 8, resize="bicubic")
