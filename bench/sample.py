"""Sampling benchmark: tokens/s of `Decoder.generate` (KV cache) vs the uncached reference sampler
(`Sampler(model, use_cache=False)`: every new token re-runs the model over the whole prefix) vs Hugging Face `generate`
(its KV cache) on the same weights.

All three complete the last S tokens of the same N - S token prompt, one token per step for every image of the batch,
from the full softmax at temperature 1 (S = N samples whole images from SOS). Correctness first: fp32 logits of ours and
HF agree to 1e-4, and the cached and uncached samplers draw the very same tokens from the same seed (fp32); otherwise
the script exits non-zero before timing. A short completion with each sampler warms it up in each precision.

    python bench/sample.py                    # 8 layers x 256 wide, B 4, N 1024, 64 new tokens
    python bench/sample.py --quick --json out.json
"""
from __future__ import annotations

import sys
from functools import partial

import torch

from common import (CorrectnessError, autocast, build_pair, check_logits, config_from_args, describe, env_info,
                    format_table, hf_generate, log, make_parser, medians, parse_args, random_ids,
                    resolve_precisions, save_results, time_interleaved, warn_if_busy)
from igpt.sampling import Sampler

FULL = dict(layers=8, width=256, heads=8, batch=4, resolution=32, sample_tokens=64, repeat=3)
QUICK = dict(layers=2, width=64, heads=4, batch=2, resolution=8, sample_tokens=8, repeat=1)
CHECK_TOKENS = 8  # tokens sampled by the cached/uncached agreement check


def cli(argv=None):
    p = make_parser(__doc__, FULL, QUICK)
    p.add_argument("--repeat", type=int, help="timed runs of each sampler (the median is reported)")
    return parse_args(p, argv, FULL, QUICK)


def samplers(ours, hf, seed: int):
    """name -> fn(prompt) returning the completed ids; new tokens = N - prompt length for every sampler."""
    def seeded():
        return torch.Generator().manual_seed(seed)

    uncached = Sampler(ours, use_cache=False)

    return {
        "cached": lambda prompt: ours.generate(prompt.shape[0], prompt=prompt, generator=seeded()),
        "uncached": lambda prompt: uncached.generate(prompt.shape[0], prompt=prompt, generator=seeded()),
        "hf": lambda prompt: hf_generate(hf, prompt, ours.cfg.n_ctx - prompt.shape[1])[:, 1:],  # drop HF's SOS
    }


def check_samplers(fns: dict, prompt: torch.Tensor, n_ctx: int) -> None:
    """Cached and uncached draw identical tokens from one seed (fp32); every sampler returns whole images that keep
    the prompt."""
    outs = {name: fn(prompt) for name, fn in fns.items()}
    P = prompt.shape[1]
    for name, out in outs.items():
        if out.shape != (prompt.shape[0], n_ctx) or not torch.equal(out[:, :P], prompt):
            raise CorrectnessError(f"{name} sampler returned shape {tuple(out.shape)} or lost the prompt")
    if not torch.equal(outs["cached"], outs["uncached"]):
        raise CorrectnessError("Decoder.generate (KV cache) and the uncached loop drew different tokens from the same "
                               "seed: the cache path does not compute the same logits as the full forward")


def main(argv=None) -> int:
    args = cli(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = config_from_args(args)
    N, S = cfg.n_ctx, args.sample_tokens
    precisions = resolve_precisions(args.precision)
    env = env_info()  # before timing: its load average and date describe the start of the run
    warn_if_busy()
    ours, hf = build_pair(cfg, args.seed)
    ours.eval(), hf.eval()
    if args.corrupt_for_test:
        with torch.no_grad():
            ours.blocks[0].attn.qkv.weight[0, 0] += 1.0
    ids = random_ids(cfg, args.batch, args.seed)
    prompt = ids[:, :N - S]
    fns = samplers(ours, hf, args.seed)
    short_prompt = ids[:, :N - min(S, CHECK_TOKENS)]
    try:
        logit_diff = check_logits(ours, hf, ids)
        check_samplers(fns, short_prompt, N)
    except CorrectnessError as e:
        sys.exit(f"sample.py: correctness check FAILED, nothing timed: {e}")

    results = {}
    for precision in precisions:
        log(f"{precision}: {args.repeat} runs of each sampler, {S} tokens x {args.batch} images")
        with autocast(precision):
            for fn in fns.values():  # warm-up in this precision: a short completion
                fn(short_prompt)
            times = time_interleaved({name: partial(fn, prompt) for name, fn in fns.items()}, 0, args.repeat)
        median = medians(times)
        results[precision] = {
            "run_s_median": median,
            "run_s_all": times,
            "tokens_per_s": {name: args.batch * S / s for name, s in median.items()},
        }

    print(f"iGPT sampling: Decoder.generate vs uncached loop vs HF generate, same weights - "
          f"{describe(cfg, args.batch, env)}")
    print(f"sample: {S} new tokens per image after a {N - S}-token prompt (--sample-tokens), full softmax, T = 1")
    print(f"correctness: fp32 logits ours vs HF agree to {logit_diff:.1e}; cached and uncached drew identical tokens; "
          f"median of {args.repeat} runs after a short warm-up, prompt encoding included\n")
    labels = {"cached": "Decoder.generate (KV cache)", "uncached": "uncached loop (re-runs prefix)",
              "hf": "HF generate (its KV cache)"}
    rows = [[p, labels[name], r["run_s_median"][name], r["tokens_per_s"][name],
             r["tokens_per_s"]["cached"] / r["tokens_per_s"][name]]
            for p, r in results.items() for name in fns]
    print(format_table(["precision", "sampler", "s/run", "tokens/s", "cached speed-up"], rows))

    save_results(args, "sample", env, dict(n_ctx=N, prompt_tokens=N - S, precisions=precisions,
                                           sampling="full softmax, temperature 1, one multinomial per image per step"),
                 correctness={"logit_max_abs_diff_fp32": logit_diff, "cached_equals_uncached_tokens": True},
                 results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
