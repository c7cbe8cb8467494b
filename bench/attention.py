"""Attention benchmark: our fused attention vs PyTorch SDPA (every backend, named) vs eager attention (materialised
softmax), forward and forward+backward, causal and bidirectional.

Sizes: N tokens (--seq), head dim D (--hdim; 64 is iGPT-S/M, 96 iGPT-L), B x H sized to fill the device: B = tokens / N
and H = width / D (--tokens, --width; FlashAttention's benchmark convention: 16k tokens, width 2048), or --batch and
--heads. Every contender computes the same thing in the same dtype: softmax(q k^T / sqrt(D) + mask) v.

Correctness first: on the first few heads (B = 1, H = 4) of each size, every contender's output (and, when
forward+backward is timed, dQ, dK, dV) is compared with the float64 reference: its max error may be at most twice
that of plain torch in the same dtype plus a small atol (FlashAttention's rule). Any disagreement exits non-zero
before anything is timed. An SDPA backend that has no kernel for the inputs (cuDNN and efficient on CPU, flash in fp32
on CUDA, ...) is skipped and listed under the table.

On a CPU-only machine the script runs the same way at small N, with a banner: 'ours' is then the CPU reference path,
not the Triton kernel (under TRITON_INTERPRET=1 the kernel runs through the interpreter, for correctness only).

    python bench/attention.py                              # GPU: N 1024 2304 4096, D 64, bf16; CPU: N 256 512, fp32
    python bench/attention.py --seq 2304 --hdim 64 96 --json out.json --plot out.png
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (CPU_BANNER, DTYPES, check_contenders, device_line, fmt_bytes, format_table, make_kernel_parser,
                    measure, ours_path, parse_kernel_args, print_header, ratio, run_kernel_benchmark, run_outputs,
                    save_results, speedups, timed_call, timing_fields, timing_method)
from igpt_kernels import attention
from igpt_kernels.reference import attention_allowed_mask, attention_reference

GPU = dict(seq=[1024, 2304, 4096], hdim=[64], tokens=16384, width=2048, dtype="bf16")
CPU = dict(seq=[256, 512], hdim=[64], tokens=1024, width=256, dtype="fp32", warmup=1, repeat=3)
QUICK = dict(seq=[64], hdim=[16], tokens=128, width=32, dtype="fp32", warmup=1, repeat=1)
CHECK_HEADS = 4  # heads of batch element 0 compared with the float64 reference (heads are independent)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
EAGER = "eager (materialised softmax)"
FLOP_MODEL = ("forward = 4*B*H*N^2*D FLOPs (the two N x N x D matmuls), halved when causal; backward = 2.5 x forward, "
              "so forward+backward = 3.5 x forward. One count for every contender, so TFLOP/s ratios are speed ratios: "
              "eager and SDPA math compute the masked half of a causal score matrix anyway, and a key-padding mask "
              "(--key-mask) does not reduce the count.")


def cli(argv=None):
    p = make_kernel_parser(__doc__, {"gpu": GPU, "cpu": CPU, "quick": QUICK})
    g = p.add_argument_group("cases")
    g.add_argument("--seq", type=int, nargs="+", help="sequence lengths N (1024 = 32^2, 2304 = 48^2, 4096 = 64^2)")
    g.add_argument("--hdim", type=int, nargs="+", help="head dims D")
    g.add_argument("--tokens", type=int, help="B = tokens / N (at least 1)")
    g.add_argument("--width", type=int, help="H = width / D (at least 1)")
    g.add_argument("--batch", type=int, help="B for every N (overrides --tokens)")
    g.add_argument("--heads", type=int, help="H for every D (overrides --width)")
    g.add_argument("--dtype", choices=sorted(DTYPES))
    g.add_argument("--mode", nargs="+", choices=("causal", "bidirectional"), default=["causal", "bidirectional"])
    g.add_argument("--pass", dest="passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    g.add_argument("--key-mask", type=float, default=0.0, metavar="FRACTION",
                   help="mask out the last FRACTION of the keys of every other batch row (key padding; default 0 = "
                        "no mask); SDPA then gets one boolean mask (causal AND key mask)")
    g.add_argument("--deterministic", action="store_true",
                   help="also time our deterministic backward (a dQ pass instead of atomic adds; Triton only)")
    p.add_argument("--plot", type=Path, help="write a PNG of TFLOP/s vs N (needs matplotlib)")
    args = parse_kernel_args(p, argv, {"gpu": GPU, "cpu": CPU, "quick": QUICK})
    if not 0 <= args.key_mask < 1:
        p.error("--key-mask must be in [0, 1): every query needs at least one key")
    if min(args.seq + args.hdim + [args.tokens, args.width, args.batch or 1, args.heads or 1]) < 1:
        p.error("--seq, --hdim, --tokens, --width, --batch and --heads must be >= 1")
    return args


def sizes(args, n: int, d: int) -> tuple[int, int]:
    """(B, H) of the timed inputs."""
    return args.batch or max(1, args.tokens // n), args.heads or max(1, args.width // d)


def flops(b: int, h: int, n: int, d: int, causal: bool, pass_: str) -> float:
    forward = 4 * b * h * n * n * d / (2 if causal else 1)
    return forward * (3.5 if pass_ == "fwd+bwd" else 1.0)


def key_padding_mask(b: int, n: int, fraction: float, device) -> torch.Tensor | None:
    """[B, N] bool, True = attend: every other batch row loses its last `fraction` of keys; None when fraction is 0."""
    if fraction == 0:
        return None
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    mask[::2, max(1, round(n * (1 - fraction))):] = False
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# Contenders: fn(q, k, v) -> out, all computing softmax(q k^T / sqrt(D) + mask) v in the inputs' dtype


def eager_attention(q, k, v, allowed):
    """Attention as written by hand: the [B, H, N, N] scores and probabilities are materialised in the input dtype."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def sdpa(q, k, v, backend, causal, mask):
    """SDPA with one backend forced. Without a key mask it gets its own causal flag; with one, a single boolean mask
    (causal AND key mask), because SDPA refuses attn_mask together with is_causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, backend)]):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def contenders(args, n: int, causal: bool, key_mask: torch.Tensor | None) -> dict:
    """name -> fn(q, k, v). The masks are built once, outside the timed calls, for every contender alike."""
    allowed = attention_allowed_mask(n, n, causal=causal, key_mask=key_mask, device=args.device)
    sdpa_mask = None if key_mask is None else allowed
    ours_label, _ = ours_path("attention", args.device)
    bump = 0.01 if args.corrupt_for_test else 0.0  # the hidden test flag: ours returns wrong values

    def ours(q, k, v, deterministic=False):
        out = attention(q, k, v, causal=causal, key_mask=key_mask, deterministic=deterministic)
        return out + bump if bump else out

    fns = {ours_label: ours}
    if args.deterministic and "Triton" in ours_label:  # the CPU reference path has no separate backward
        fns[f"{ours_label} deterministic"] = lambda q, k, v: ours(q, k, v, deterministic=True)
    fns[EAGER] = lambda q, k, v: eager_attention(q, k, v, allowed)
    for backend in SDPA_BACKENDS:
        fns[f"SDPA {backend.split('_')[0].lower()}"] = (
            lambda q, k, v, backend=backend: sdpa(q, k, v, backend, causal, sdpa_mask))
    return fns


def sdpa_skip_reason(name: str, error: RuntimeError) -> str | None:
    """SDPA with a forced backend raises when that backend has no kernel for the inputs: a skip, not a failure."""
    if name.startswith("SDPA") and ("No available kernel" in str(error) or "No viable backend" in str(error)):
        return "no kernel of this backend for these inputs"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Correctness and timing


def check_case(args, n: int, d: int, causal: bool, backward: bool) -> dict:
    """Every contender vs the float64 reference on CHECK_HEADS heads of batch element 0 (common.check_contenders)."""
    dtype = DTYPES[args.dtype]
    heads = min(sizes(args, n, d)[1], CHECK_HEADS)
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v, do = (torch.randn(1, heads, n, d, generator=gen).to(dtype).to(args.device) for _ in range(4))
    key_mask = key_padding_mask(1, n, args.key_mask, args.device)
    grads = [do] if backward else None

    def reference(*qkv):
        return attention_reference(*qkv, causal=causal, key_mask=key_mask)

    exact = run_outputs(reference, [q.double(), k.double(), v.double()], (0, 1, 2),
                        [do.double()] if backward else None)
    plain = run_outputs(reference, [q, k, v], (0, 1, 2), grads)
    case = f"N={n}, D={d}, {'causal' if causal else 'bidirectional'}, {args.dtype}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns at length about each backend it cannot use
        return check_contenders(case, contenders(args, n, causal, key_mask), [q, k, v], (0, 1, 2), grads, exact,
                                plain, ["out", "dq", "dk", "dv"], "attention", args.device, sdpa_skip_reason)


def timed_fns(args, n: int, d: int, causal: bool, pass_: str, names: list[str]) -> tuple[dict, float]:
    """({name: no-argument callable} on the full-size inputs for the contenders in `names`, FLOPs of one call)."""
    b, h = sizes(args, n, d)
    torch.manual_seed(args.seed)
    backward = pass_ == "fwd+bwd"
    q, k, v, do = (torch.randn(b, h, n, d, device=args.device, dtype=DTYPES[args.dtype]) for _ in range(4))
    inputs = [t.requires_grad_(backward) for t in (q, k, v)]
    key_mask = key_padding_mask(b, n, args.key_mask, args.device)
    fns = {name: timed_call(fn, inputs, (0, 1, 2), [do] if backward else None)
           for name, fn in contenders(args, n, causal, key_mask).items() if name in names}
    return fns, flops(b, h, n, d, causal, pass_)


def time_case(args, n: int, d: int, causal: bool, pass_: str, runnable: list[str]) -> list[dict]:
    """Rows of one size and pass: median ms, TFLOP/s, peak memory of every contender in `runnable`."""
    fns, work = timed_fns(args, n, d, causal, pass_, runnable)
    rows = []
    for name, m in measure(fns, args.device, args).items():
        row = base_row(args, n, d, causal, pass_, name, flops=work, **timing_fields(m))
        if "ms_median" in row:
            row["tflops"] = work / row["ms_median"] / 1e9
        rows.append(row)
    timed = {r["contender"]: r["ms_median"] for r in rows if "ms_median" in r and r["contender"].startswith("SDPA")}
    best_sdpa = min(timed, key=timed.get) if timed else None
    speedups(rows, {"eager": EAGER, "best_sdpa": best_sdpa})
    for r in rows:
        r["best_sdpa"] = best_sdpa
    return rows


def base_row(args, n: int, d: int, causal: bool, pass_: str, contender: str, **extra) -> dict:
    b, h = sizes(args, n, d)
    return {"n": n, "d": d, "batch": b, "heads": h, "causal": causal, "key_mask": args.key_mask, "pass": pass_,
            "contender": contender, **extra}


# ----------------------------------------------------------------------------------------------------------------------
# Output


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        mode = "causal" if r["causal"] else "bidir"
        head = [r["n"], r["d"], f"{r['batch']}x{r['heads']}", mode, r["pass"], r["contender"]]
        if "ms_median" in r:
            out.append(head + [r["ms_median"], r["tflops"], fmt_bytes(r["peak_memory_bytes"]),
                               ratio(r["speedup_vs_eager"]), ratio(r["speedup_vs_best_sdpa"])])
        else:
            out.append(head + [r["note"], "", "", "", ""])
    return format_table(["N", "D", "BxH", "attention", "pass", "contender", "ms", "TFLOP/s", "peak mem", "vs eager",
                         "vs best SDPA"], out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """TFLOP/s vs N: one panel per (mask, pass), one line per contender and head dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "tflops" in r]
    panels = sorted({(r["causal"], r["pass"]) for r in timed}, key=lambda p: (not p[0], p[1]))
    cols = min(2, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(6 * cols, 4 * -(-len(panels) // cols)),
                             squeeze=False)
    contenders_ = sorted({r["contender"] for r in timed})
    dims = sorted({r["d"] for r in timed})
    for ax, (causal, pass_) in zip(axes.flat, panels):
        for contender in contenders_:
            for d in dims:
                pts = sorted((r["n"], r["tflops"]) for r in timed
                             if (r["contender"], r["d"], r["causal"], r["pass"]) == (contender, d, causal, pass_))
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{contenders_.index(contender)}",
                            linestyle=("-", "--", ":", "-.")[dims.index(d) % 4], label=f"{contender}, D={d}")
        ax.set_title(f"{'causal' if causal else 'bidirectional'}, {pass_}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["n"] for r in timed}), [str(n) for n in sorted({r["n"] for r in timed})])
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = cli(argv)
    ours_label, _ = ours_path("attention", args.device)
    cases = [(n, d, causal) for d in args.hdim for n in args.seq for causal in (True, False)
             if ("causal" if causal else "bidirectional") in args.mode]
    backward = "fwd+bwd" in args.passes
    env, checks, rows, notes = run_kernel_benchmark(
        "attention.py", args, "attention", cases, lambda case: check_case(args, *case, backward),
        lambda case, pass_, names: time_case(args, *case, pass_, names),
        lambda case: f"N={case[0]} D={case[1]} {'causal' if case[2] else 'bidirectional'}")

    title = f"attention, {args.dtype}: {ours_label} vs SDPA backends vs eager"
    masked = f"last {args.key_mask:.0%} of the keys of every other batch row" if args.key_mask else "none"
    print_header(title, env, args.device, args,
                 f"sizes: B = {'--batch' if args.batch else f'{args.tokens} tokens / N'}, "
                 f"H = {'--heads' if args.heads else f'{args.width} / D'}; key padding mask: {masked}",
                 f"FLOP model: {FLOP_MODEL}")
    print(f"correctness: before timing, outputs{' and dQ/dK/dV' if backward else ''} of every contender on "
          f"{CHECK_HEADS} heads of each size agree with the float64 reference (max error <= 2 x plain torch's + "
          "atol)\n")
    print(table(rows))
    for note in notes:
        print(f"not run: {note}")
    if args.plot:
        plot(rows, args.plot, f"{title}\n{device_line(env)}")
        print(f"\nwrote {args.plot}")
    save_results(args, "attention", env, dict(ours=ours_label, flop_model=FLOP_MODEL,
                                              timing=timing_method(args.device, args),
                                              banner=CPU_BANNER if args.device.type == "cpu" else None),
                 correctness=checks, notes=notes, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
