"""pytest-benchmark cases: `pytest bench/ --benchmark-only` (groups attention, norm, embedding, train-step, sample).

Each case first checks its contender against the reference with the benchmark scripts' own checks (a failure fails the
test), then times one call per round. `extra_info` holds the work of a call (FLOPs or bytes, under the scripts' models)
and, when timed, TFLOP/s or GB/s from the median. Sizes: IGPT_BENCH_SIZE=tiny|full; the default is full on a CUDA
machine (the scripts' GPU defaults) and tiny elsewhere. On CPU, 'ours' is the kernels' torch reference path, not
Triton (see the scripts' banner). With --benchmark-disable every case runs once: tests/test_bench_smoke.py runs this
file that way in the default test suite.

    pytest bench/ --benchmark-only                          # timing
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-json=out.json
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import attention
import embedding
import norm
import train
from common import ours_path

SIZE = os.environ.get("IGPT_BENCH_SIZE", "full" if torch.cuda.is_available() else "tiny")
if SIZE not in ("tiny", "full"):
    raise ValueError(f"IGPT_BENCH_SIZE must be tiny or full, got {SIZE!r}")
TINY = ["--quick"] if SIZE == "tiny" else []
PASSES = ("fwd", "fwd+bwd")

ATTENTION = attention.cli(TINY)
NORM = norm.cli(TINY + ["--no-compile"] if SIZE == "tiny" else [])  # compiling costs seconds per case on CPU
EMBEDDING = embedding.cli(TINY + ["--no-compile"] if SIZE == "tiny" else [])
TRAIN = train.cli(TINY)
DEVICE = ATTENTION.device


RATES = {"flops": ("tflops", 1e12), "bytes": ("gb_per_s", 1e9), "tokens": ("tokens_per_s", 1.0)}


def run(benchmark, name: str, fn, work: float, unit: str) -> None:
    """Time fn (synchronising CUDA inside each call); record the contender, its work per call in `unit` and, when
    timed, the rate from the median (TFLOP/s, GB/s or tokens/s)."""
    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update({"contender": name, "device": str(DEVICE), "size": SIZE, unit: work})
    benchmark(call)
    if benchmark.stats is not None:  # None with --benchmark-disable
        key, scale = RATES[unit]
        benchmark.extra_info[key] = work / benchmark.stats.stats.median / scale


def contender(report: dict, key: str) -> str:
    """The full contender name for a short key ('ours', 'eager', 'sdpa-flash', ...); skips when it did not run."""
    names = {name: result for name, result in report.items()
             if name.lower().replace(" ", "-").startswith(key) or (key == "eager" and name.startswith("eager"))}
    if not names:
        pytest.skip(f"no contender {key!r} here")
    name, result = next(iter(names.items()))
    if not isinstance(result, dict):
        pytest.skip(f"{name}: {result}")
    if name.startswith("ours") and not ours_path("attention", DEVICE)[1]:
        pytest.skip(f"{name}: checked, not timed (interpreter)")
    return name


# ----------------------------------------------------------------------------------------------------------------------
# attention


@functools.lru_cache(maxsize=None)
def attention_check(n, d, causal):
    return attention.check_case(ATTENTION, n, d, causal, backward=True)


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("d", ATTENTION.hdim)
@pytest.mark.parametrize("n", ATTENTION.seq)
@pytest.mark.parametrize("who", ["ours", "eager", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"])
def test_attention(benchmark, who, n, d, causal, pass_):
    name = contender(attention_check(n, d, causal), who)
    fns, work = attention.timed_fns(ATTENTION, n, d, causal, pass_, [name])
    run(benchmark, name, fns[name], work, "flops")


# ----------------------------------------------------------------------------------------------------------------------
# norm


@functools.lru_cache(maxsize=None)
def norm_check(width, residual):
    return norm.check_case(NORM, width, residual, backward=True)


@pytest.mark.benchmark(group="norm")
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("width", NORM.width)
@pytest.mark.parametrize("who", ["ours", "f.rms_norm", "eager", "torch.compile"])
def test_norm(benchmark, who, width, residual, pass_):
    name = contender(norm_check(width, residual), who)
    fns, moved = norm.timed_fns(NORM, width, residual, pass_, [name])
    run(benchmark, name, fns[name], moved, "bytes")


# ----------------------------------------------------------------------------------------------------------------------
# embedding


@functools.lru_cache(maxsize=None)
def embedding_check(res, width, pixels):
    return embedding.check_case(EMBEDDING, res, width, pixels, True, backward=True)


@pytest.mark.benchmark(group="embedding")
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("pixels", [False, True], ids=["ids", "pixels"])
@pytest.mark.parametrize("width", EMBEDDING.width)
@pytest.mark.parametrize("res", EMBEDDING.resolution)
@pytest.mark.parametrize("who", ["ours", "eager", "torch.compile"])
def test_embedding(benchmark, who, res, width, pixels, pass_):
    name = contender(embedding_check(res, width, pixels), who)
    fns, moved = embedding.timed_fns(EMBEDDING, res, width, pixels, True, pass_, [name])
    run(benchmark, name, fns[name], moved, "bytes")


# ----------------------------------------------------------------------------------------------------------------------
# training step and sampling


@functools.lru_cache(maxsize=None)
def train_setup():
    """The variants (Decoder / FusedDecoder x AC none / full), checked against each other once."""
    from igpt import IGPTConfig

    cfg = IGPTConfig.preset(TRAIN.preset, resolution=TRAIN.resolution, objective=TRAIN.objective)
    models, ids, bert_mask, _ = train.build(TRAIN, cfg)
    train.check_variants(models, ids, bert_mask, TRAIN.precision, DEVICE)
    return models, ids, bert_mask, train.train_flops(cfg, TRAIN.batch * cfg.n_ctx, causal=cfg.causal)


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("ac", ["none", "full"])
@pytest.mark.parametrize("model", ["Decoder", "FusedDecoder"])
def test_train_step(benchmark, model, ac):
    models, ids, bert_mask, flops = train_setup()
    name = next(n for n in models if n.startswith(model + " ") and n.endswith(f"AC {ac}"))
    step = train.train_step_fn(models[name], train.loss_fn, ids, TRAIN.precision, bert_mask)
    run(benchmark, name, step, flops, "flops")


@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("model", ["Decoder", "FusedDecoder"])
def test_sample(benchmark, model):
    """Sampling with the KV cache: the last 8 tokens of each image after a prompt, full softmax at temperature 1."""
    from igpt import Decoder, FusedDecoder, IGPTConfig

    cfg = IGPTConfig.preset("tiny", resolution=4 if SIZE == "tiny" else 32)
    torch.manual_seed(0)
    net = (Decoder if model == "Decoder" else FusedDecoder)(cfg).to(DEVICE).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, cfg.n_ctx - 8), device=DEVICE)
    tokens = net.generate(2, prompt=prompt, generator=torch.Generator(DEVICE).manual_seed(0))
    assert tokens.shape == (2, cfg.n_ctx) and torch.equal(tokens[:, :cfg.n_ctx - 8], prompt)
    run(benchmark, f"{model}.generate (KV cache)",
        lambda: net.generate(2, prompt=prompt, generator=torch.Generator(DEVICE).manual_seed(0)), 2 * 8, "tokens")
