"""igpt.memory: the estimator against what the tiny model really saves and allocates on CPU.

Measurements:
  * saved for backward: torch.autograd.graph.saved_tensors_hooks records every tensor autograd saves; the bytes are
    the sum over unique storages (views of one tensor count once), parameters and the input ids left out.
  * peak of a step: torch.profiler.profile(profile_memory=True) records every CPU allocator event ([memory] events:
    +bytes on allocation, -bytes on free); their running sum in time order is the memory in use above what was
    allocated before the step, and its maximum the step's peak. Plus what was allocated before (parameters, AdamW
    states, ids), counted from the tensors themselves. Exact for torch's allocations (no malloc fragmentation, unlike
    ru_maxrss), and fast (~1 s per profiled step of the tiny model).
"""
import functools
import subprocess
import sys

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.profiler import ProfilerActivity, profile

from igpt import Decoder, FusedDecoder, IGPTConfig
from igpt.memory import GiB, estimate, main, max_micro_batch, measure_saved_bytes, saved_activation_bytes

MiB = 1 << 20
TINY = IGPTConfig.preset("tiny", resolution=16)  # 4 layers, width 128, 256 tokens


def _model(cls=Decoder, cfg=TINY, ac="none"):
    torch.manual_seed(0)
    model = cls(cfg)
    for i in range(cfg.n_layer):
        if ac == "full" or (ac.startswith("every-") and i % int(ac.removeprefix("every-")) == 0):
            # as igpt/train.py --ac wraps blocks 0, K, 2K, ...: torch's non-reentrant checkpoint around the block
            model.blocks[i] = checkpoint_wrapper(model.blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def _ids(cfg, batch):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.n_ctx), generator=torch.Generator().manual_seed(1))


def _profile_memory(fn):
    """(peak, end): the largest and the final sum of CPU allocations minus frees while fn runs, in bytes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak, current


def _tensor_bytes(tensors):
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


# ----------------------------------------------------------------------------------------------------------------------
# (1) What one block and the whole forward save, against autograd


@pytest.mark.parametrize("cls, policy, overrides", [
    (Decoder, "fp32", {}),  # eager norm, torch SDPA (flash on CPU: O and LSE, no N x N)
    (FusedDecoder, "fp32", dict(attention="materialized")),  # CPU: the kernels' torch references, N x N probs
    (Decoder, "autocast-bf16", dict(norm="eager", attention="sdpa")),  # fp32 stream, bf16 matmuls
])
def test_block_saved_bytes_match_autograd(cls, policy, overrides):
    model, B = _model(cls), 2
    block = model.blocks[0]
    h = torch.randn(B, TINY.n_ctx, TINY.n_embd, requires_grad=True)
    amp = policy == "autocast-bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        measured, _ = measure_saved_bytes(lambda: block(h), exclude=list(model.parameters()))
    est = saved_activation_bytes(TINY, B, policy=policy, **overrides)
    predicted = sum(est["per_block"].values())
    if amp:  # autocast saves a bf16 copy of each Linear weight: counted under gathered_params, not activations
        predicted += sum(p.numel() * 2 for p in block.parameters() if p.dim() == 2)
    print(f"{cls.__name__} {policy}: one block saves {measured} B, estimated {predicted} B")
    assert abs(predicted - measured) <= 0.01 * measured


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_forward_saved_bytes_match_autograd(objective):
    cfg = IGPTConfig.preset("tiny", resolution=16, objective=objective)
    model, B = _model(cfg=cfg), 2
    ids = _ids(cfg, B)
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.15 if objective == "bert" else None
    measured, _ = measure_saved_bytes(lambda: model.loss(ids, mask), exclude=[*model.parameters(), ids])
    extra = {} if mask is None else dict(bert_mask_prob=mask.float().mean().item())
    est = saved_activation_bytes(cfg, B, policy="fp32", **extra)
    predicted = est["blocks"] + est["head"]
    print(f"{objective}: forward saves {measured} B, estimated {predicted} B "
          f"(blocks {est['blocks']}, head {est['head']})")
    assert abs(predicted - measured) <= 0.02 * measured


# ----------------------------------------------------------------------------------------------------------------------
# (2) + (3) The peak of a training step, measured with the profiler; activation checkpointing


STEP_BATCH = 2
_hold = []  # keeps a forward's graph alive while the profiler is on


@functools.lru_cache(maxsize=None)
def _measure_step(ac, batch=STEP_BATCH):
    """(peak of one AdamW training step, bytes alive after a forward pass) of the tiny model, on CPU."""
    model = _model(ac=ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    ids = _ids(TINY, batch)

    def step():
        model.loss(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for p in model.parameters():  # allocate AdamW's states (lazily created by the first step) without a full step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = _tensor_bytes([*model.parameters(), *(v for st in opt.state.values() for v in st.values()), ids])
    peak, end = _profile_memory(step)
    assert abs(end) < MiB  # nothing leaked: the step returns to where it started
    _, after_forward = _profile_memory(lambda: _hold.append(model.loss(ids)))  # saved for backward + the loss
    _hold.clear()
    return before + peak, after_forward


@pytest.mark.parametrize("ac", ["none", "full", "every-2"])
def test_step_peak_matches_profiler(ac):
    measured, _ = _measure_step(ac)
    est = estimate(TINY, STEP_BATCH, policy="fp32", ac=ac)
    print(f"ac={ac}: measured peak {measured / MiB:.2f} MiB, estimated {est.total / MiB:.2f} MiB "
          f"(peak at {est.phase})\n{est}")
    assert abs(est.total - measured) <= 0.10 * measured


def test_checkpointing_drops_saved_bytes_as_estimated():
    saved = {}
    for ac in ("none", "full"):
        _, after_forward = _measure_step(ac)
        est = saved_activation_bytes(TINY, STEP_BATCH, policy="fp32", ac=ac)
        predicted = est["blocks"] + est["head"]
        print(f"ac={ac}: alive after forward {after_forward} B, estimated saved {predicted} B")
        assert abs(predicted - after_forward) <= 0.02 * after_forward
        saved[ac] = after_forward
    # Full AC keeps each block's input (C numbers per token) instead of 22C; the head's log-probs stay: ~9x less.
    assert saved["full"] < 0.3 * saved["none"]
    for cfg in (TINY, IGPTConfig.preset("l", resolution=48)):
        for kw in (dict(policy="fp32"), dict(world_size=8)):
            none, full = (estimate(cfg, 4, ac=ac, **kw) for ac in ("none", "full"))
            every2 = estimate(cfg, 4, ac="every-2", **kw)
            assert full.total < every2.total < none.total
            assert full.activations < none.activations


# ----------------------------------------------------------------------------------------------------------------------
# (4) Shape of the estimate


def test_monotonic_in_batch_and_fsdp_divides_sharded_terms():
    cfg = IGPTConfig.preset("m", resolution=48)
    for ac in ("none", "full"):
        totals = [estimate(cfg, b, world_size=8, ac=ac).total for b in (1, 2, 4, 8, 16)]
        assert totals == sorted(totals) and len(set(totals)) == len(totals)
    one, eight = estimate(cfg, 4, world_size=1), estimate(cfg, 4, world_size=8)
    assert one.setup.fsdp and eight.setup.fsdp
    P = cfg.num_params()
    assert one.params == 4 * P and eight.params == -(-4 * P // 8)  # fp32 master, sharded
    assert one.optimizer == 8 * P and eight.optimizer == -(-8 * P // 8)  # two fp32 AdamW states
    opt_one, opt_eight = (estimate(cfg, 4, world_size=w, ac="full", optimizer="fused") for w in (1, 8))
    assert opt_eight.phases["optimizer"] < opt_one.phases["optimizer"] / 7
    # Activations do not shard: the same per rank at any world size.
    assert one.activations == eight.activations
    with pytest.raises(ValueError, match="fsdp"):
        estimate(cfg, 4, world_size=8, policy="fp32")
    with pytest.raises(ValueError, match="every-K"):
        estimate(cfg, 4, ac="every-0")
    with pytest.raises(ValueError, match="attention"):
        estimate(cfg, 4, attention="naive")


def test_max_micro_batch_is_the_largest_that_fits():
    cfg = IGPTConfig.preset("l", resolution=48)
    budget = 80 * GiB
    for ac in ("none", "full"):
        mb = max_micro_batch(cfg, budget, world_size=8, ac=ac)
        assert mb >= 1
        assert estimate(cfg, mb, world_size=8, ac=ac).total <= budget < estimate(cfg, mb + 1, world_size=8, ac=ac).total
    assert max_micro_batch(cfg, budget, world_size=8, ac="full") > max_micro_batch(cfg, budget, world_size=8)
    assert max_micro_batch(cfg, 1 * MiB, world_size=8) == 0


def test_materialized_attention_is_quadratic():
    cfg = IGPTConfig.preset("s", resolution=48)
    flash = estimate(cfg, 1, world_size=8, attention="flash").activations
    mat = estimate(cfg, 1, world_size=8, attention="materialized").activations
    probs = saved_activation_bytes(cfg, 1, world_size=8, attention="materialized")["per_block"]["attn_probs"]
    assert probs == 2 * cfg.n_head * cfg.n_ctx ** 2 * 2  # softmax and its masked copy, bf16, per sample
    assert mat > 3 * flash


# ----------------------------------------------------------------------------------------------------------------------
# (5) The CLI


def test_cli_prints_the_table(capsys):
    assert main(["--preset", "s", "m", "l", "--resolution", "48", "--gpus", "8", "--gpu-mem-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "2304 tokens" in out and "estimate" in out.lower()
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in "SML"]
    assert len(rows) == 6  # S/M/L x AC none/full
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[-2]) >= 1 and int(cells[-1]) == 8 * int(cells[-2])


def test_cli_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "igpt.memory", "--preset", "l", "--ac", "full", "every-4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| L |" in out.stdout and "every-4" in out.stdout


def test_cli_rejects_bad_options(capsys):
    for argv in (["--ac", "sometimes"], ["--policy", "fp32"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "every-K" in err and "--gpus 1" in err
