"""The command-line contract (igpt/cli.py, docs/DESIGN.md "Command lines"): user errors are one `PROG: error:` line
with exit status 2 (--debug keeps the traceback, bugs always do), --help shows every default, torchrun ranks other
than 0 print no help, and a command that fails at start leaves no run directory behind."""
import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from igpt import cli

REPO = Path(__file__).resolve().parents[1]


def command(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd or REPO,
                          env={**os.environ, **(env or {})})


def test_a_missing_checkpoint_is_one_line_saying_it_does_not_exist(tmp_path):
    proc = command("-m", "igpt.sample", "--checkpoint", str(tmp_path / "does-not-exist"), "--out", "x.png",
                   cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("sample.py: error: ") and "does-not-exist does not exist" in proc.stderr
    debug = command("-m", "igpt.sample", "--debug", "--checkpoint", str(tmp_path / "does-not-exist"), "--out", "x.png",
                    cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_an_empty_imagefolder_is_one_line_and_leaves_no_run_dir(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    out = tmp_path / "runs" / "demo"
    proc = command("-m", "igpt.train", "--dataset", f"imagefolder:{tmp_path / 'images'}", "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("train.py: error: --dataset imagefolder:") and "no image files" in proc.stderr
    assert not (tmp_path / "runs").exists()


def run_main(main, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    return exit_info.value.code


def test_run_turns_user_errors_into_one_line_and_keeps_bugs(capsys):
    def fails(error):
        def main(argv):
            cli.parser().parse_args(argv)
            raise error
        return main

    for error in (ValueError("bad value\nsecond line"), FileNotFoundError("no such file"),
                  cli.CheckpointError("corrupt"), SystemExit("--resume: no checkpoint")):
        assert run_main(fails(error), []) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.endswith(f"error: {' '.join(str(error).split())}\n"), err
    with pytest.raises(ValueError):  # --debug: the exception itself, with its traceback
        cli.run(fails(ValueError("bad")), ["--debug"])
    with pytest.raises(KeyError):  # a bug is never turned into a one-liner
        cli.run(fails(KeyError("bug")), [])
    with pytest.raises(TypeError):
        cli.run(fails(TypeError("bug")), [])
    assert run_main(lambda argv: 0, []) == 0 and run_main(lambda argv: 3, []) == 3


def test_new_dir_removes_only_what_it_created(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "user.txt").write_text("mine")
    for target in (kept, kept / "a" / "b"):
        with pytest.raises(RuntimeError):
            with cli.new_dir(target):
                (target / "palette.npy").write_text("partial")
                raise RuntimeError("start failed")
    assert sorted(p.name for p in kept.iterdir()) == ["palette.npy", "user.txt"]  # existing dir: nothing removed
    with cli.new_dir(kept / "c" / "d") as made:  # success keeps it
        assert made.is_dir()
    assert (kept / "c" / "d").is_dir()


def test_train_that_fails_after_opening_the_data_leaves_no_run_dir(tmp_path):
    """The palette fit (too few pixels for 512 colours) fails after --out was needed: the new dir goes again."""
    from PIL import Image

    from igpt.train import main as train_main

    for i in range(4):
        (tmp_path / "images" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / "images" / "c" / f"{i}.png")
    out = tmp_path / "runs" / "demo"
    with pytest.raises(ValueError):
        train_main(["--dataset", f"imagefolder:{tmp_path / 'images'}", "--resolution", "8", "--batch-size", "2",
                    "--workers", "0", "--out", str(out)])
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------------
# --help


def _bench(name):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


def _commands():
    from igpt import convert, memory, probe, sample, train

    yield "igpt.train", lambda argv: train.parse_args(argv)
    yield "igpt.convert", convert.main
    yield "igpt.sample", sample.main
    yield "igpt.probe", probe.main
    yield "igpt.memory", memory.main
    for name in ("data", "peer", "sample", "attention", "norm", "embedding", "train"):
        module = _bench(name)
        yield f"bench/{name}.py", getattr(module, "cli", None) or module.main


def help_of(main, monkeypatch, capsys):
    """(--help text, the parser that printed it)."""
    parsers = []
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a, **k: parsers.append(self) or
                        real(self, *a, **k))
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out, parsers[0]


def option_help(text: str, option: str) -> str:
    """The help of one option in --help output, its wrapped lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s+(-\w, )?{re.escape(option)}\b", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s+-", lines[i]) or not lines[i].strip()),
               len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_help_shows_every_default(monkeypatch, capsys):
    for name, main in _commands():
        text, parser = help_of(main, monkeypatch, capsys)
        checked = 0
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
                continue  # flags (store_true) are off unless given; None defaults are described in words
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            assert f"(default: {shown})" in option_help(text, action.option_strings[-1]), (name, action.dest, text)
            checked += 1
        assert checked or name == "igpt.convert", name  # convert: every option is required or a choice of two
        assert "--debug" in text or name.startswith("bench/"), name  # bench scripts: the help defaults only
    text, _ = help_of(dict(_commands())["igpt.train"], monkeypatch, capsys)
    assert "(default: 0.0)" in option_help(text, "--weight-decay")  # ours, not torch's AdamW 0.01
    text, _ = help_of(dict(_commands())["igpt.sample"], monkeypatch, capsys)
    for option, default in (("--n", 16), ("--seed", 0), ("--temperature", 1.0)):
        assert f"(default: {default})" in option_help(text, option), option
    assert "(default: all, the full softmax)" in option_help(text, "--top-k")


def test_only_rank_0_prints_help_and_usage_errors():
    script = str(REPO / "igpt" / "train.py")
    other = command(script, "--help", env={"RANK": "1"})
    assert other.returncode == 0 and other.stdout == "" and other.stderr == ""
    first = command(script, "--help", env={"RANK": "0"})
    assert first.returncode == 0 and "--preset" in first.stdout
    bad = command(script, "--resolution", "4", env={"RANK": "1", "LOCAL_RANK": "1"})
    assert bad.returncode == 2 and bad.stderr == ""
    assert "--resolution must be >= 8" in command(script, "--resolution", "4").stderr


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_prints_help_once():
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.run([sys.executable, torchrun, "--standalone", "--nproc_per_node=2", "igpt/train.py", "--help"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("usage: train.py") == 1
