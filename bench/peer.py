"""CPU peer benchmark: our `Decoder` vs Hugging Face `ImageGPTForCausalImageModeling` holding the same weights.

For each precision (fp32, and bf16 autocast where the CPU has native bf16) both models are measured the same way:
  * training step tokens/s: forward + backward + AdamW step on one fixed batch (warm-up steps, then the median step);
  * sampling tokens/s: our `Decoder.generate` (KV cache) vs HF `generate(do_sample=True, top_k=0)` (its cache), both
    completing the last S tokens of a prompt of N - S tokens (S = N samples whole images from SOS);
  * the measured matmul peak in that precision, and each training step's FLOP/s as a fraction of it;
  * the ceiling of the training ratio on this machine: HF's step time over the time a step would take doing only its
    necessary matmul FLOPs (the causal half of the scores) at that peak, with norms, softmax and optimizer free. No
    implementation beats HF by more here; when HF already runs near the peak, the ceiling is low.
Ours is compiled by default: the training step runs `torch.compile(Decoder.loss)` and sampling runs
`igpt.sampling.compile_sampler(model).generate` (the decode step compiled with the weights frozen into the graph,
recompiled in each precision since training moved the weights); `--no-compile` runs both eager. HF runs eager, as
shipped. Compiling happens in the first calls, which are timed separately and never counted in the timed steps.
Correctness first: fp32 logits must agree to 1e-4 and the two losses must agree in every precision, or the script
exits non-zero before timing.

    python bench/peer.py                      # 8 layers x 256 wide, B 4, N 1024, training compiled
    python bench/peer.py --no-compile         # ours eager
    python bench/peer.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from common import (LOSS_RTOL, CorrectnessError, autocast, build_pair, check_logits, config_from_args,
                    describe, env_info, format_table, hf_generate, hf_logits, log, make_parser,
                    matmul_peak, medians, parse_args, random_ids, resolve_precisions, save_results,
                    time_interleaved, train_step_fn, warn_if_busy)
from igpt.convert import to_hf
from igpt.sampling import Sampler, compile_sampler
from igpt.flops import FLOP_MODEL as COUNTED_FLOP_MODEL, matmul_params, train_flops

# Both sides are counted alike, so the full score matrix (PaLM's and nanoGPT's convention) keeps the ratios honest;
# only the floor, the least work an AR step must do, takes the causal half.
FLOP_MODEL = (f"{COUNTED_FLOP_MODEL}; here with no causal halving, as in PaLM (Chowdhery et al. 2022, app. B) and "
              "nanoGPT's estimate_mfu, except for the floor")

FULL = dict(layers=8, width=256, heads=8, batch=4, resolution=32, steps=3, warmup=1, sample_tokens=256,
            sample_repeat=3, matmul_size=4096)
QUICK = dict(layers=2, width=64, heads=4, batch=2, resolution=8, steps=1, warmup=1, sample_tokens=8,
             sample_repeat=1, matmul_size=256)
CHECK_TOKENS = 8  # new tokens of the short sampling run that checks shapes and warms the samplers up


def cli(argv=None):
    p = make_parser(__doc__, FULL, QUICK)
    p.add_argument("--steps", type=int, help="timed training steps (the median is reported)")
    p.add_argument("--warmup", type=int, help="untimed training steps first")
    p.add_argument("--sample-repeat", type=int, help="timed sampling runs after a short warm-up (median)")
    p.add_argument("--matmul-size", type=int, help="n of the n x n x n matmul that measures the peak")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="our training loss under torch.compile and our sampler through igpt.sampling.compile_sampler; "
                   "default on, off under --quick")
    args = parse_args(p, argv, FULL, QUICK)
    if args.compile is None:
        args.compile = not args.quick
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The two losses: the same next-token cross-entropy over all N tokens and the 512 palette classes


def hf_loss(hf, ids):
    # HF's labels= loss drops the last position (it shifts labels inside): the explicit CE on logits aligned with ours
    # is the same quantity our model.loss computes.
    return F.cross_entropy(hf_logits(hf, ids).flatten(0, 1).float(), ids.flatten())


def check_losses(ours: Ours, hf, ids, precision: str) -> tuple[float, float]:
    """Our loss (the function the training step times; with grad enabled, so a compiled loss compiles the graph the
    step runs) against HF's."""
    with autocast(precision):
        a = ours.loss(ours.model, ids).item()
        with torch.no_grad():
            b = hf_loss(hf, ids).item()
    rtol = LOSS_RTOL[precision]
    if not abs(a - b) <= rtol * abs(b):
        raise CorrectnessError(f"{precision} losses differ: ours {a:.6f} vs HF {b:.6f} (rtol {rtol:.0e})")
    return a, b


class Ours:
    """Our side of the comparison: `Decoder.loss` eager or under `torch.compile` for the training step, and
    `Sampler(model).generate` (what `Decoder.generate` runs) or `compile_sampler(model).generate` for sampling."""

    def __init__(self, model, compiled: bool):
        self.model, self.compiled = model, compiled
        self.sampler = Sampler(model)
        loss = torch.compile(model.loss, fullgraph=True) if compiled else model.loss
        self.loss = lambda _, ids: loss(ids)  # train_step_fn's loss_fn(model, ids)

    def describe(self) -> str:
        if not self.compiled:
            return "ours: eager Decoder (loss and generate as written; --compile compiles both)"
        return ("ours: torch.compile(Decoder.loss, fullgraph=True) in the training step (inductor), "
                "igpt.sampling.compile_sampler(model).generate (decode step compiled, weights frozen) for sampling; "
                "HF: eager")

    def prepare_sampling(self) -> None:
        """A compiled sampler freezes the weights it first runs with: compile it anew for the current weights."""
        if self.compiled:
            self.sampler = compile_sampler(self.model)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def call_timed(fn):
    """(result, wall seconds) of one call: for a compiled function its first call, which compiles (reported, never
    timed)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# Measurements


def sample_fns(ours, hf, prompt: torch.Tensor, new_tokens: int, seed: int):
    """Callables sampling `new_tokens` per image after `prompt` [B, P], each model with its own cached decoder."""
    def sample_ours():
        return ours.generate(prompt.shape[0], prompt=prompt, generator=torch.Generator().manual_seed(seed))

    def sample_hf():
        return hf_generate(hf, prompt, new_tokens)

    return sample_ours, sample_hf


def check_samplers(ours: Ours, hf, ids, seed: int) -> float:
    """A short completion (the last CHECK_TOKENS tokens) with each sampler: both must return whole images that keep the
    prompt. It also warms the samplers up. Returns the seconds of our first call."""
    N = ours.model.cfg.n_ctx
    prompt = ids[:, :N - min(CHECK_TOKENS, N)]
    sample_ours, sample_hf = sample_fns(ours.sampler, hf, prompt, N - prompt.shape[1], seed)
    a, first_s = call_timed(sample_ours)
    b = sample_hf()
    P = prompt.shape[1]
    if a.shape != (ids.shape[0], N) or not torch.equal(a[:, :P], prompt):
        raise CorrectnessError(f"our generate returned {tuple(a.shape)} or lost the prompt")
    if b.shape != (ids.shape[0], N + 1) or not torch.equal(b[:, 1:P + 1], prompt):
        raise CorrectnessError(f"HF generate returned {tuple(b.shape)} (expected SOS + {N} tokens) or lost the prompt")
    return first_s


def bench_precision(args, cfg, ours: Ours, hf, ids, initial_state, precision: str) -> dict:
    # Each precision starts from the same weights on both sides (training moved them in the previous precision).
    ours.load_state_dict(initial_state)
    hf.load_state_dict(to_hf(ours.model))
    ours.model.train()
    (loss_ours, loss_hf), loss_check_s = call_timed(lambda: check_losses(ours, hf, ids, precision))

    N, S = cfg.n_ctx, args.sample_tokens
    ours.model.eval(), hf.eval()
    ours.prepare_sampling()
    sample_ours, sample_hf = sample_fns(ours.sampler, hf, ids[:, :N - S], S, args.seed)
    log(f"{precision}: losses agree; sampling {S} tokens x {args.batch} images, {args.sample_repeat} runs each")
    with autocast(precision):
        sample_first_s = check_samplers(ours, hf, ids, args.seed)
        sample_all = time_interleaved({"ours": sample_ours, "hf": sample_hf}, 0, args.sample_repeat)
    sample_s = medians(sample_all)

    steps = {"ours": train_step_fn(ours.model, ours.loss, ids, precision),
             "hf": train_step_fn(hf, hf_loss, ids, precision)}
    # ours' first step compiles the backward (the loss check compiled the forward); it is not one of the warm-up steps
    train_first_s = call_timed(steps["ours"])[1] if ours.compiled else None
    log(f"{precision}: training steps ({args.warmup} warm-up + {args.steps} timed, each model)")
    step_s = time_interleaved(steps, args.warmup, args.steps)
    step_median = medians(step_s)
    log(f"{precision}: matmul peak ({args.matmul_size}^3)")
    peak = matmul_peak(precision, args.matmul_size)
    tokens = args.batch * cfg.n_ctx
    flops = train_flops(cfg, tokens, causal=False)
    # The fastest any implementation could train on this machine: the step's necessary matmul FLOPs (causal half of
    # the scores) at the measured peak, everything else free. HF's step time over it bounds the ours/HF ratio.
    floor_s = train_flops(cfg, tokens, causal=True) / peak
    train_tokens = args.batch * N
    return {
        "loss": {"ours": loss_ours, "hf": loss_hf},
        # wall seconds of ours' first calls, compiling included (compiled runs only); never part of a timed step
        "first_calls_s": {"loss_check": loss_check_s, "train_step": train_first_s, "sample_check": sample_first_s}
        if ours.compiled else None,
        "train": {
            "step_s_median": step_median,
            "step_s_all": step_s,
            "tokens_per_s": {k: train_tokens / v for k, v in step_median.items()},
            "flop_per_s": {k: flops / v for k, v in step_median.items()},
            "fraction_of_matmul_peak": {k: flops / v / peak for k, v in step_median.items()},
            "floor_s": floor_s,
            "ratio_ceiling": step_median["hf"] / floor_s,
        },
        "sample": {
            "new_tokens_per_image": S,
            "prompt_tokens": N - S,
            "run_s_median": sample_s,
            "run_s_all": sample_all,
            "tokens_per_s": {k: args.batch * S / v for k, v in sample_s.items()},
        },
        "matmul_peak_flop_per_s": peak,
    }


# ----------------------------------------------------------------------------------------------------------------------


def table(results: dict, sample_tokens: int) -> str:
    rows = []
    for precision, r in results.items():
        t, s = r["train"], r["sample"]
        rows += [
            [precision, "train step tokens/s", t["tokens_per_s"]["ours"], t["tokens_per_s"]["hf"]],
            [precision, f"sample tokens/s ({sample_tokens} new)", s["tokens_per_s"]["ours"], s["tokens_per_s"]["hf"]],
            [precision, "train TFLOP/s", t["flop_per_s"]["ours"] / 1e12, t["flop_per_s"]["hf"] / 1e12],
            [precision, "train % of matmul peak", 100 * t["fraction_of_matmul_peak"]["ours"],
             100 * t["fraction_of_matmul_peak"]["hf"]],
        ]
    rows = [[*row, row[2] / row[3]] for row in rows]
    lines = [f"{precision}: training ours/HF ceiling {r['train']['ratio_ceiling']:.2f}x (HF's step over a step that did "
             f"only its matmul FLOPs, causal half of the scores, at the measured matmul peak: "
             f"{r['train']['floor_s']:.3g} s)" for precision, r in results.items()]
    return format_table(["precision", "measurement", "ours", "HF", "ours/HF"], rows) + "\n" + "\n".join(lines)


def main(argv=None) -> int:
    args = cli(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = config_from_args(args)
    precisions = resolve_precisions(args.precision)
    env = env_info()  # before timing: its load average and date describe the start of the run
    warn_if_busy()
    ours, hf = build_pair(cfg, args.seed)
    if args.corrupt_for_test:
        with torch.no_grad():
            hf.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    ids = random_ids(cfg, args.batch, args.seed)
    initial_state = {k: v.clone() for k, v in ours.state_dict().items()}
    try:
        logit_diff = check_logits(ours, hf, ids)
        side = Ours(ours, args.compile)
        results = {p: bench_precision(args, cfg, side, hf, ids, initial_state, p) for p in precisions}
    except CorrectnessError as e:
        sys.exit(f"peer.py: correctness check FAILED, nothing timed: {e}")

    N, S = cfg.n_ctx, args.sample_tokens
    print(f"iGPT Decoder vs HF ImageGPTForCausalImageModeling, same weights - {describe(cfg, args.batch, env)}; "
          f"fp32 logits agree to {logit_diff:.1e}")
    print(side.describe())
    print(f"train: median of {args.steps} steps after {args.warmup} warm-up, AdamW(lr 1e-4)")
    print(f"sample: {S} new tokens per image after a {N - S}-token prompt (--sample-tokens; encoding the prompt is "
          f"included), full softmax, T = 1, median of {args.sample_repeat} runs after a short warm-up")
    for p, r in results.items():
        print(f"{p}: losses ours {r['loss']['ours']:.5f} / HF {r['loss']['hf']:.5f}; "
              f"matmul peak {r['matmul_peak_flop_per_s'] / 1e12:.3g} TFLOP/s ({args.matmul_size}^3)")
        if r["first_calls_s"]:
            first = r["first_calls_s"]
            print(f"{p}: ours' first calls, compiling included, not timed: loss check {first['loss_check']:.1f} s, "
                  f"first train step {first['train_step']:.1f} s, first (short) sampling {first['sample_check']:.1f} s")
    print(f"FLOP model: {FLOP_MODEL}")
    print(f"  = {train_flops(cfg, args.batch * N, causal=False) / 1e9:.1f} GFLOP per step "
          f"(P = {matmul_params(cfg):,})\n")
    print(table(results, S))

    save_results(args, "peer", env, dict(n_ctx=N, prompt_tokens=N - S, precisions=precisions,
                                         optimizer="AdamW(lr=1e-4)", ours=side.describe()),
                 correctness={"logit_max_abs_diff_fp32": logit_diff}, flop_model=FLOP_MODEL,
                 train_flops_per_step=train_flops(cfg, args.batch * N, causal=False), matmul_params=matmul_params(cfg),
                 results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
