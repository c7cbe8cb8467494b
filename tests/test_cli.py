"""End to end on the embedded data: train a few steps, reload the weights, sample a PNG grid."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igpt import Decoder
from igpt.train import lr_at, main as train_main, parse_args

REPO = Path(__file__).resolve().parents[1]


def test_train_then_sample(tmp_path):
    run = tmp_path / "run"
    model = train_main(["--resolution", "8", "--steps", "10", "--batch-size", "8", "--warmup", "2", "--eval-every",
                        "5", "--eval-batches", "1", "--precision", "fp32", "--out", str(run)])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 11))
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in lines) and "eval_loss" in lines[4]
    assert lines[0]["loss"] == pytest.approx(6.2383, abs=1e-3)  # zero-init head: ln(512)
    assert lines[-1]["eval_loss"] < lines[4]["eval_loss"] < 6.2383  # the held-out loss falls
    loaded = Decoder.from_pretrained(run)
    assert loaded.palette is not None and loaded.cfg.resolution == 8
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k

    from igpt.sample import main as sample_main

    from PIL import Image

    sample_main(["--checkpoint", str(run), "--out", str(tmp_path / "grid.png"), "--n", "4"])
    assert Image.open(tmp_path / "grid.png").size == (2 * 32 + 2, 2 * 32 + 2)
    completions = ["--checkpoint", str(run), "--n", "2", "--prompt-dataset", "shapes", "--prompts", "2"]
    sample_main([*completions, "--out", str(tmp_path / "compl.png")])
    assert Image.open(tmp_path / "compl.png").size == (4 * 32 + 3 * 2, 2 * 32 + 2)
    sample_main([*completions, "--out", str(tmp_path / "compiled.png"), "--compile"])  # the same draws, compiled
    assert Image.open(tmp_path / "compiled.png").tobytes() == Image.open(tmp_path / "compl.png").tobytes()


def test_train_bert_objective(tmp_path):
    train_main(["--objective", "bert", "--resolution", "8", "--steps", "2", "--batch-size", "4", "--warmup", "1",
                "--precision", "fp32", "--out", str(tmp_path / "bert")])
    assert Decoder.from_pretrained(tmp_path / "bert").cfg.objective == "bert"


def test_train_shape_flags_override_the_preset(tmp_path):
    train_main(["--n-layer", "3", "--n-embd", "48", "--n-head", "3", "--resolution", "8", "--steps", "1",
                "--batch-size", "2", "--warmup", "1", "--precision", "fp32", "--out", str(tmp_path / "run")])
    cfg = Decoder.from_pretrained(tmp_path / "run").cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (3, 48, 3)
    assert parse_args([]).n_layer is None  # the preset's unless asked


def test_train_runs_as_a_file_like_torchrun_does(tmp_path):
    # `torchrun igpt/train.py` puts igpt/ itself first on sys.path; the script must still import the package
    out = subprocess.run([sys.executable, str(REPO / "igpt" / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout


def test_lr_schedule_warms_up_then_decays_to_zero():
    args = parse_args(["--steps", "100", "--warmup", "10", "--lr", "1.0"])
    lrs = [lr_at(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def test_missing_dataset_is_a_clear_error(tmp_path):
    # (unreachable hub ids are tested offline in test_data_sources.py)
    from igpt.data import DatasetUnavailableError

    with pytest.raises(DatasetUnavailableError, match="imagefolder"):
        train_main(["--dataset", f"imagefolder:{tmp_path / 'nowhere'}", "--steps", "1", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------------------
# igpt.sample on real images: completions of held-out images of any dataset spec the trainer takes


def random_checkpoint(path, resolution=8, palette=True):
    """A random-init (randomized) Decoder with a random 512-colour palette, saved as igpt.sample loads it."""
    from igpt import IGPTConfig, Palette

    g = torch.Generator().manual_seed(0)
    model = Decoder(IGPTConfig(n_layer=2, n_embd=32, n_head=4, resolution=resolution))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # the zero-init head would draw uniform noise
    if palette:
        model.attach_palette(Palette(torch.rand(512, 3, generator=g) * 2 - 1))
    return model.save_pretrained(path)


def grid_tiles(png, R, upscale=4, gap=2):
    """igpt.sample's grid -> uint8 [rows, cols, R, R, 3] tiles (undoing the nearest-neighbour upscaling)."""
    import numpy as np
    from PIL import Image

    a = torch.from_numpy(np.array(Image.open(png).convert("RGB")))
    T = R * upscale + gap
    rows, cols = (a.shape[0] + gap) // T, (a.shape[1] + gap) // T
    assert (a.shape[0], a.shape[1]) == (rows * T - gap, cols * T - gap)
    return torch.stack([torch.stack([a[i * T:i * T + R * upscale:upscale, j * T:j * T + R * upscale:upscale]
                                     for j in range(cols)]) for i in range(rows)])


def random_images(n, seed=0):
    """n random RGB PIL images of varied non-square sizes (the centre crop has something to choose)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (rng.integers(9, 14), rng.integers(9, 14), 3), dtype=np.uint8))
            for _ in range(n)]


def test_sample_completes_held_out_images_of_an_imagefolder(tmp_path):
    """Each row: the prompt (its top rows, the rest grey), n completions that keep the prompt's rows, and the original
    (the held-out image, centre-cropped at the model's resolution, quantized); --no-cache draws the same PNG."""
    from igpt.sample import HIDDEN, main as sample_main
    from igpt.sources import open_source

    ckpt, R = random_checkpoint(tmp_path / "ckpt"), 8
    folder = tmp_path / "folder"
    for k, image in enumerate(random_images(60)):  # a held-out 5%: 3 images
        (folder / f"class{k % 2}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"class{k % 2}" / f"{k}.png")
    spec = f"imagefolder:{folder}"
    args = ["--checkpoint", str(ckpt), "--prompt-dataset", spec, "--prompts", "3", "--n", "4"]
    sample_main([*args, "--out", str(tmp_path / "grid.png")])
    tiles = grid_tiles(tmp_path / "grid.png", R)
    assert tiles.shape[:2] == (3, 1 + 4 + 1)

    model = Decoder.from_pretrained(ckpt)
    held_out = open_source(spec, "test", R).get([0, 1, 2], train=False)[0]  # what the trainer evaluates on
    quantized = model.palette.decode(model.palette.quantize(held_out))
    assert not torch.equal(quantized, model.palette.decode(model.palette.quantize(
        open_source(spec, "test", R).get([0, 1, 2], train=True)[0])))  # a random crop would show other pixels
    half = R // 2
    for i in range(3):
        prompt, completions, original = tiles[i, 0], tiles[i, 1:-1], tiles[i, -1]
        assert torch.equal(original, quantized[i])
        assert torch.equal(prompt[:half], original[:half]) and bool((prompt[half:] == HIDDEN).all())
        assert all(torch.equal(c[:half], original[:half]) for c in completions)  # the given rows are kept
        assert not all(torch.equal(c[half:], completions[0][half:]) for c in completions[1:])  # sampled, not copied

    sample_main([*args, "--out", str(tmp_path / "uncached.png"), "--no-cache"])
    assert (tmp_path / "uncached.png").read_bytes() == (tmp_path / "grid.png").read_bytes()

    sample_main([*args, "--out", str(tmp_path / "rows.png"), "--prompt-rows", "2", "--prompts", "1"])
    prompt, completions = grid_tiles(tmp_path / "rows.png", R)[0, 0], grid_tiles(tmp_path / "rows.png", R)[0, 1:-1]
    assert torch.equal(prompt[:2], quantized[0, :2]) and bool((prompt[2:] == HIDDEN).all())
    assert all(torch.equal(c[:2], quantized[0, :2]) for c in completions)


def test_sample_prompts_from_a_save_to_disk_dataset_and_shapes(tmp_path):
    import datasets

    from igpt.sample import main as sample_main

    ckpt = random_checkpoint(tmp_path / "ckpt")
    ds = datasets.Dataset.from_dict({"picture": random_images(20)},
                                    features=datasets.Features({"picture": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "saved"))  # no test split: the held-out 5% of train, one image
    for spec in (str(tmp_path / "saved"), "shapes"):
        sample_main(["--checkpoint", str(ckpt), "--prompt-dataset", spec, "--prompts", "1", "--n", "2",
                     "--out", str(tmp_path / "grid.png")])
        tiles = grid_tiles(tmp_path / "grid.png", 8)
        assert tiles.shape[:2] == (1, 4) and torch.equal(tiles[0, 1, :4], tiles[0, -1, :4])
    with pytest.raises(ValueError, match="only 1 images"):
        sample_main(["--checkpoint", str(ckpt), "--prompt-dataset", str(tmp_path / "saved"), "--prompts", "2",
                     "--out", str(tmp_path / "grid.png")])


def test_sample_rejects_bad_prompt_rows_and_a_checkpoint_without_palette(tmp_path, capsys):
    from igpt.sample import main as sample_main

    ckpt = random_checkpoint(tmp_path / "ckpt")
    for rows in ("0", "8"):
        with pytest.raises(SystemExit) as e:
            sample_main(["--checkpoint", str(ckpt), "--prompt-dataset", "shapes", "--prompt-rows", rows,
                         "--out", str(tmp_path / "grid.png")])
        assert e.value.code == 2 and "--prompt-rows must be in 1..7" in capsys.readouterr().err
    for flags, message in ((["--no-cache", "--compile"], "--no-cache"), (["--prompt-rows", "2"], "--prompt-dataset")):
        with pytest.raises(SystemExit) as e:
            sample_main(["--checkpoint", str(ckpt), *flags, "--out", str(tmp_path / "grid.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    bare = random_checkpoint(tmp_path / "bare", palette=False)
    with pytest.raises(ValueError, match="no palette.npy"):
        sample_main(["--checkpoint", str(bare), "--prompt-dataset", "shapes", "--out", str(tmp_path / "grid.png")])
    assert not (tmp_path / "grid.png").exists()
