"""The trainer at scale on CPU: FSDP2 over 2 gloo processes vs 1 process, exact resume after kill -9, activation
checkpointing, gradient accumulation, checkpoint integrity. Tiny model, 8x8 images, fp32."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from igpt import Decoder, IGPTConfig, checkpoint
from igpt.memory import measure_saved_bytes
from igpt.model import Block
from igpt.train import apply_activation_checkpointing, main as train_main

REPO = Path(__file__).resolve().parents[1]
BLOCK_FORWARD = Block.forward
BASE = ["--resolution", "8", "--batch-size", "4", "--warmup", "2", "--precision", "fp32", "--log-every", "100",
        "--eval-every", "1000", "--eval-batches", "1"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def torchrun(nproc: int, args: list[str], **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "igpt" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own process groups)."""
    def children(p):
        try:
            return [int(c) for t in Path(f"/proc/{p}/task").iterdir() for c in (t / "children").read_text().split()]
        except OSError:
            return []
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    for p in reversed(tree):  # workers first, so nothing is left to notice and restart them
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_to_end(nproc: int, args: list[str]) -> None:
    proc = torchrun(nproc, args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]


def test_two_processes_match_one_process(tmp_path):
    steps = ["--steps", "5"]
    train_main([*BASE, *steps, "--out", str(tmp_path / "one")])
    run_to_end(2, [*BASE, *steps, "--out", str(tmp_path / "two")])
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w1, w2 = Decoder.from_pretrained(tmp_path / "one"), Decoder.from_pretrained(tmp_path / "two")
    for k, v in w1.state_dict().items():
        torch.testing.assert_close(w2.state_dict()[k], v, rtol=1e-3, atol=1e-4)  # Adam amplifies ~0 grads


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_after_checkpoint_then_resume_is_bit_identical(tmp_path, nproc):
    # 16x16 and 60 steps: long enough (seconds) that the kill lands mid-run even on a loaded machine
    args = [*BASE, "--resolution", "16", "--steps", "60", "--ckpt-every", "5", "--keep", "2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_to_end(nproc, [*args, "--out", str(full)])

    proc = torchrun(nproc, [*args, "--out", str(killed)])
    deadline = time.time() + 300
    while checkpoint.latest(killed / "checkpoints") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model.safetensors").exists()
    k = int(checkpoint.latest(killed / "checkpoints").name.removeprefix("step-"))
    assert k < 60

    run_to_end(nproc, [*args, "--out", str(killed), "--resume"])
    resumed, reference = records(killed), records(full)
    assert [r["step"] for r in resumed] == list(range(1, 61)), "metrics.jsonl must hold every step exactly once"
    for a, b in zip(reference[k:], resumed[k:]):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    final_a, final_b = Decoder.from_pretrained(full), Decoder.from_pretrained(killed)
    assert all(torch.equal(v, final_b.state_dict()[n]) for n, v in final_a.state_dict().items())


def test_resume_on_a_different_number_of_processes_continues_the_run(tmp_path):
    args = [*BASE, "--steps", "4", "--ckpt-every", "2"]
    train_main([*args, "--out", str(tmp_path / "ref")])
    train_main([*BASE, "--steps", "4", "--ckpt-every", "2", "--out", str(tmp_path / "run")])
    (tmp_path / "run" / "model.safetensors").unlink()
    # Drop the last checkpoint so the resume starts at step 2, then continue on 2 processes.
    for step, path in checkpoint.step_dirs(tmp_path / "run" / "checkpoints"):
        if step == 4:
            import shutil
            shutil.rmtree(path)
    run_to_end(2, [*args, "--out", str(tmp_path / "run"), "--resume"])
    for a, b in zip(records(tmp_path / "ref"), records(tmp_path / "run")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    train_main([*BASE, "--steps", "3", "--out", str(tmp_path / "a")])
    train_main([*BASE, "--steps", "3", "--grad-accum", "2", "--out", str(tmp_path / "b")])
    for a, b in zip(records(tmp_path / "a"), records(tmp_path / "b")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_bert_trains_with_checkpoints(tmp_path):
    train_main([*BASE, "--objective", "bert", "--steps", "2", "--ckpt-every", "1", "--keep", "1",
                "--out", str(tmp_path)])
    assert [s for s, _ in checkpoint.step_dirs(tmp_path / "checkpoints")] == [2]  # --keep 1
    assert all(r["loss"] > 0 for r in records(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint integrity


def _run_with_checkpoints(out: Path) -> None:
    train_main([*BASE, "--steps", "4", "--ckpt-every", "2", "--keep", "3", "--out", str(out)])


def test_corrupt_or_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    _run_with_checkpoints(tmp_path)
    step4 = tmp_path / "checkpoints" / "step-4"
    shard = next(step4.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match=str(shard).replace(".", r"\.") + ".*truncated"):
        train_main([*BASE, "--steps", "6", "--ckpt-every", "2", "--out", str(tmp_path), "--resume"])
    assert step4.exists() and (tmp_path / "checkpoints" / "step-2").exists()  # nothing good was replaced
    data = bytearray((tmp_path / "checkpoints" / "step-2" / "rng-rank0.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, flipped bits
    (tmp_path / "checkpoints" / "step-2" / "rng-rank0.safetensors").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"rng-rank0\.safetensors is corrupt"):
        checkpoint.verify(tmp_path / "checkpoints" / "step-2")
    with pytest.raises(checkpoint.CheckpointError, match="rng-rank0"):
        Decoder.from_pretrained(tmp_path / "checkpoints" / "step-2")


def test_a_save_that_dies_midway_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    _run_with_checkpoints(tmp_path)
    ckpts = tmp_path / "checkpoints"
    before = {p.name: sorted(f.name for f in p.iterdir()) for _, p in checkpoint.step_dirs(ckpts)}

    def dies(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("torch.distributed.checkpoint.save", dies)
    with pytest.raises(OSError, match="disk full"):
        train_main([*BASE, "--steps", "6", "--ckpt-every", "2", "--keep", "1", "--out", str(tmp_path), "--resume"])
    after = {p.name: sorted(f.name for f in p.iterdir()) for _, p in checkpoint.step_dirs(ckpts)}
    assert after == before  # step-2 and step-4 intact; the torn step-6 never became a checkpoint
    assert checkpoint.verify(checkpoint.latest(ckpts))["step"] == 4


def test_incomplete_checkpoint_without_manifest_is_refused(tmp_path):
    _run_with_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "step-4" / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json is missing"):
        train_main([*BASE, "--steps", "6", "--out", str(tmp_path), "--resume"])


def test_resume_with_different_arguments_is_refused(tmp_path):
    _run_with_checkpoints(tmp_path)
    with pytest.raises(SystemExit, match="--batch-size 4 .now 8"):
        train_main([*BASE[:2], "--batch-size", "8", *BASE[4:], "--steps", "6", "--out", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit, match="--n-layer None .now 3"):  # a shape flag the run did not use
        train_main([*BASE, "--n-layer", "3", "--steps", "6", "--out", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_main([*BASE, "--steps", "2", "--out", str(tmp_path / "empty"), "--resume"])


def test_checkpoints_load_as_models(tmp_path):
    _run_with_checkpoints(tmp_path)
    final = Decoder.from_pretrained(tmp_path)
    step4 = Decoder.from_pretrained(tmp_path / "checkpoints" / "step-4")
    assert step4.palette is not None
    assert all(torch.equal(v, step4.state_dict()[k]) for k, v in final.state_dict().items())
    (tmp_path / "model.safetensors").unlink()  # a run dir without final weights -> its latest checkpoint
    assert all(torch.equal(v, Decoder.from_pretrained(tmp_path).state_dict()[k]) for k, v in final.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing


def _grads_and_stats(ac: str, monkeypatch):
    torch.manual_seed(0)
    model = Decoder(IGPTConfig.preset("tiny", resolution=8))
    apply_activation_checkpointing(model, ac)
    calls = []
    # Count Block.forward itself: the recomputation calls it directly (module hooks do not fire there).
    index = {id(getattr(b, "_checkpoint_wrapped_module", b)): i for i, b in enumerate(model.blocks)}
    def counted_forward(self, *a, **k):
        calls.append(index[id(self)])
        return BLOCK_FORWARD(self, *a, **k)

    monkeypatch.setattr(Block, "forward", counted_forward)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    saved_bytes, loss = measure_saved_bytes(lambda: model.loss(ids), exclude=[*model.parameters(), ids])
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
    return grads, calls, saved_bytes, model


def test_activation_checkpointing_recomputes_saves_less_and_keeps_gradients(monkeypatch):
    grads, calls, saved, _ = _grads_and_stats("none", monkeypatch)
    assert calls == [0, 1, 2, 3]
    for mode, recomputed in [("full", [0, 1, 2, 3]), ("every-2", [0, 2])]:
        g, c, s, model = _grads_and_stats(mode, monkeypatch)
        assert sorted(c) == sorted([0, 1, 2, 3] + recomputed), f"{mode}: block forwards {c}"
        assert s < saved * (0.2 if mode == "full" else 0.7), f"{mode}: {s} saved bytes vs {saved} without AC"
        assert g.keys() == grads.keys()
        for name in grads:
            assert torch.equal(g[name], grads[name]), name
        assert set(model.state_dict()) == set(Decoder(model.cfg).state_dict())  # keys unchanged by the wrapper


def test_bad_ac_mode_is_a_clear_error():
    with pytest.raises(SystemExit):
        train_main(["--ac", "every-0", "--steps", "1"])
    with pytest.raises(ValueError, match="every-K"):
        apply_activation_checkpointing(Decoder(IGPTConfig.preset("tiny", resolution=8)), "sometimes")
