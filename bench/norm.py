"""Norm benchmark: our fused iGPT norm (RMS-style, optional fused residual add) vs `F.rms_norm` vs the eager
`igpt.model.rms_norm` (what `Decoder` runs) vs torch.compile of the eager norm, forward and forward+backward.

The norm is memory bound, so the measure is achieved bandwidth: GB/s = bytes moved / time under the byte model below
(the minimum traffic of the op, the same for every contender), also as a percentage of the measured device copy
bandwidth (x.clone() of a large tensor). Correctness first: on the first rows of each size, every contender's output
(and dx, dweight, d residual when forward+backward is timed) must agree with the float64 reference (max error <= 2 x
plain torch's in the same dtype + atol), or the script exits non-zero before timing. On a CPU-only machine the script
runs with a banner: 'ours' is then the CPU reference path, not the Triton kernel.

    python bench/norm.py                          # GPU: 32768 rows x C 512 1024 1536 3072, bf16; CPU: 4096 x 512 1536
    python bench/norm.py --width 1536 --residual --json out.json
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import (COMPILED_PREFIX, DTYPES, add_bandwidth_args, check_contenders, compile_skip_reason, copy_bandwidth,
                    fmt_bytes, format_table, log, make_kernel_parser, measure, ours_path, parse_kernel_args,
                    print_header, ratio, run_kernel_benchmark, run_outputs, save_results, speedups, timed_call,
                    timing_fields)
from igpt.model import rms_norm
from igpt_kernels import norm
from igpt_kernels.reference import norm_reference

GPU = dict(rows=32768, width=[512, 1024, 1536, 3072], dtype="bf16", copy_mib=1024)
CPU = dict(rows=4096, width=[512, 1536], dtype="fp32", copy_mib=256, warmup=2, repeat=10)
QUICK = dict(rows=64, width=[32], dtype="fp32", copy_mib=8, warmup=1, repeat=1)
CHECK_ROWS = 1024
EPS = 1e-5
EAGER = "eager (igpt.model.rms_norm)"
F_RMS = "F.rms_norm"
BYTE_MODEL = ("bytes = the minimum traffic, the same for every contender (R rows, C width, s bytes per element). "
              "forward: read x, w, write y = (2RC + C)s; with the residual add also read r and write h = x + r: "
              "(4RC + C)s. backward: read x (h), w, dy, write dx, dw = (3RC + 2C)s; with the residual also read dh "
              "(the gradient reaching h downstream): (4RC + 2C)s (d residual = dx is not counted again). Saved "
              "statistics (our rstd), dw partial sums and autograd's copies are not counted. forward+backward = the "
              "sum.")


def cli(argv=None):
    profiles = {"gpu": GPU, "cpu": CPU, "quick": QUICK}
    p = make_kernel_parser(__doc__, profiles)
    g = p.add_argument_group("cases")
    g.add_argument("--rows", type=int, help="rows R (tokens: batch x sequence)")
    g.add_argument("--width", type=int, nargs="+", help="row widths C (iGPT: s 512, m 1024, l 1536, xl 3072)")
    g.add_argument("--dtype", choices=sorted(DTYPES))
    g.add_argument("--residual", nargs="+", choices=("no", "yes"), default=["no", "yes"],
                   help="without and/or with the fused residual add (y = norm(x + r), h = x + r)")
    add_bandwidth_args(p, g, compiled="the eager norm")
    args = parse_kernel_args(p, argv, profiles)
    if args.rows < 1 or min(args.width) < 1 or args.copy_mib < 1:
        p.error("--rows, --width and --copy-mib must be >= 1")
    return args


def bytes_moved(rows: int, width: int, elem: int, residual: bool, pass_: str) -> int:
    fwd = ((4 if residual else 2) * rows * width + width) * elem
    bwd = ((4 if residual else 3) * rows * width + 2 * width) * elem
    return fwd + (bwd if pass_ == "fwd+bwd" else 0)


def contenders(args, residual: bool) -> dict:
    """name -> fn(x, w, r) returning y, or (y, h) with the residual add."""
    ours_label, _ = ours_path("norm", args.device)
    bump = 0.01 if args.corrupt_for_test else 0.0  # the hidden test flag: ours returns wrong values

    def ours(x, w, r):
        out = norm(x, w, EPS, residual=r)
        return (out[0] + bump, out[1]) if residual and bump else out + bump if bump else out

    def with_residual(fn):
        if not residual:
            return lambda x, w, r: fn(x, w)

        def add_then_norm(x, w, r):
            h = x + r
            return fn(h, w), h
        return add_then_norm

    eager = with_residual(lambda x, w: rms_norm(x, w, EPS))
    fns = {ours_label: ours, F_RMS: with_residual(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)),
           EAGER: eager}
    if args.compile:
        fns[f"{COMPILED_PREFIX}(eager)"] = torch.compile(eager, dynamic=False)
    return fns


def inputs_for(args, rows: int, width: int, residual: bool, generator=None):
    """x, w, r (None without the residual), dy and dh (None without the residual) in the benchmark dtype."""
    dtype = DTYPES[args.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(args.device)

    x, w = randn(rows, width), 1 + 0.1 * randn(width)
    r = randn(rows, width) if residual else None
    dy, dh = randn(rows, width), (randn(rows, width) if residual else None)
    return x, w, r, dy, dh


def check_case(args, width: int, residual: bool, backward: bool) -> dict:
    rows = min(args.rows, CHECK_ROWS)
    x, w, r, dy, dh = inputs_for(args, rows, width, residual, torch.Generator().manual_seed(args.seed))
    wrt = (0, 1, 2) if residual else (0, 1)
    grads = ([dy, dh] if residual else [dy]) if backward else None

    def reference(x, w, r):
        return norm_reference(x, w, EPS, residual=r)

    exact = run_outputs(reference, [x.double(), w.double(), None if r is None else r.double()], wrt,
                        None if grads is None else [g.double() for g in grads])
    plain = run_outputs(reference, [x, w, r], wrt, grads)
    names = (["y", "h"] if residual else ["y"]) + (["dx", "dw"] + (["dr"] if residual else []) if backward else [])
    case = f"C={width}, {'residual' if residual else 'no residual'}, {args.dtype}"
    return check_contenders(case, contenders(args, residual), [x, w, r], wrt, grads, exact, plain, names, "norm",
                            args.device, compile_skip_reason)


def timed_fns(args, width: int, residual: bool, pass_: str, names: list[str]) -> tuple[dict, int]:
    """({name: no-argument callable} on the full-size inputs for the contenders in `names`, bytes moved per call)."""
    backward = pass_ == "fwd+bwd"
    torch.manual_seed(args.seed)
    x, w, r, dy, dh = inputs_for(args, args.rows, width, residual)
    inputs = [t.requires_grad_(backward) if t is not None else None for t in (x, w, r)]
    wrt = (0, 1, 2) if residual else (0, 1)
    grads = ([dy, dh] if residual else [dy]) if backward else None
    fns = {name: timed_call(fn, inputs, wrt, grads) for name, fn in contenders(args, residual).items()
           if name in names}
    return fns, bytes_moved(args.rows, width, x.element_size(), residual, pass_)


def time_case(args, width: int, residual: bool, pass_: str, runnable: list[str], copy_bw: float) -> list[dict]:
    fns, moved = timed_fns(args, width, residual, pass_, runnable)
    rows = []
    for name, m in measure(fns, args.device, args).items():
        row = dict(rows=args.rows, width=width, residual=residual, dtype=args.dtype, contender=name, bytes=moved,
                   **{"pass": pass_}, **timing_fields(m))
        if "ms_median" in row:
            row["gb_per_s"] = moved / row["ms_median"] / 1e6
            row["fraction_of_copy_bandwidth"] = row["gb_per_s"] * 1e9 / copy_bw
        rows.append(row)
    speedups(rows, {"eager": EAGER, "f_rms_norm": F_RMS})
    return rows


def table(rows: list[dict]) -> str:
    out = [[r["rows"], r["width"], "yes" if r["residual"] else "no", r["pass"], r["contender"],
            *([r["ms_median"], r["gb_per_s"], f"{100 * r['fraction_of_copy_bandwidth']:.0f}%",
               fmt_bytes(r["peak_memory_bytes"]), ratio(r["speedup_vs_eager"]), ratio(r["speedup_vs_f_rms_norm"])]
              if "ms_median" in r else [r["note"], "", "", "", "", ""])]
           for r in rows]
    return format_table(["rows", "C", "residual", "pass", "contender", "ms", "GB/s", "% copy BW", "peak mem",
                         "vs eager", "vs F.rms_norm"], out)


def main(argv=None) -> int:
    args = cli(argv)
    ours_label, _ = ours_path("norm", args.device)
    log(f"copy bandwidth: x.clone() of {args.copy_mib} MiB")
    copy_bw = copy_bandwidth(args.device, args.copy_mib * 2**20, args)
    backward = "fwd+bwd" in args.passes
    env, checks, rows, notes = run_kernel_benchmark(
        "norm.py", args, "norm", [(c, res == "yes") for c in args.width for res in args.residual],
        lambda case: check_case(args, *case, backward),
        lambda case, pass_, names: time_case(args, *case, pass_, names, copy_bw),
        lambda case: f"C={case[0]} {'residual' if case[1] else 'plain'}")

    print_header(f"iGPT norm, {args.dtype}: {ours_label} vs F.rms_norm vs eager"
                 + (" vs torch.compile(eager)" if args.compile else ""), env, args.device, args,
                 f"byte model: {BYTE_MODEL}",
                 f"device copy bandwidth: {copy_bw / 1e9:.1f} GB/s (x.clone() of {args.copy_mib} MiB: read + write)")
    print(f"correctness: before timing, every contender's outputs{' and gradients' if backward else ''} on the "
          f"first {min(args.rows, CHECK_ROWS)} rows agree with the float64 reference (max error <= 2 x plain "
          "torch's + atol)\n")
    print(table(rows))
    for note in notes:
        print(f"not run: {note}")
    save_results(args, "norm", env, dict(ours=ours_label, byte_model=BYTE_MODEL, eps=EPS),
                 copy_bandwidth_bytes_per_s=copy_bw, notes=notes, correctness=checks, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
