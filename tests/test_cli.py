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
