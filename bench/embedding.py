"""Embedding benchmark: our fused palette-lookup embedding (uint8 RGB or token ids -> nearest palette colour ->
wte[id] + wpe[pos], with the AR shift or the BERT mask) vs the eager path of `Decoder` (`Palette.quantize` for pixels,
then `Decoder.embed`) vs torch.compile of that eager path, forward and forward+backward (gradients of wte, wpe, sos).

Memory bound: the measure is GB/s under the byte model below (the op's minimum traffic, the same for every contender)
and its percentage of the measured device copy bandwidth. Correctness first: on the first batch rows of each size,
every contender's h (and gradients) must agree with the float64 reference (max error <= 2 x plain torch's + atol),
the ids from pixels must equal the exact quantize rule bit for bit, and the eager contender must equal
`Decoder.embed_input` exactly; otherwise the script exits non-zero before timing. Pixels are uniformly random, so
nearly every colour is distinct (Palette.quantize de-duplicates colours; real images have fewer). On a CPU-only machine
the script runs with a banner: 'ours' is then the CPU reference path, not the Triton kernel.

    python bench/embedding.py               # GPU: 65536 tokens, 32^2 48^2 64^2, C 512 1536, bf16; CPU: 8192, 32^2, 512
    python bench/embedding.py --input pixels --objective ar bert --json out.json
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import (COMPILED_PREFIX, DTYPES, CorrectnessError, add_bandwidth_args, check_contenders,
                    compile_skip_reason, copy_bandwidth, fmt_bytes, format_table, log, make_kernel_parser, measure,
                    ours_path, parse_kernel_args, print_header, ratio, run_kernel_benchmark, run_outputs, save_results,
                    speedups, timed_call, timing_fields)
from igpt import Decoder, IGPTConfig, Palette
from igpt.model import random_bert_mask
from igpt_kernels import palette_embedding
from igpt_kernels.reference import palette_embedding_reference, quantize_reference

GPU = dict(tokens=65536, resolution=[32, 48, 64], width=[512, 1536], dtype="bf16", copy_mib=1024)
CPU = dict(tokens=8192, resolution=[32], width=[512], dtype="fp32", copy_mib=256, warmup=2, repeat=10)
QUICK = dict(tokens=64, resolution=[4], width=[32], dtype="fp32", copy_mib=8, warmup=1, repeat=1)
V = 512
CHECK_BATCH = 4
EAGER = "eager (Decoder path)"
BYTE_MODEL = ("bytes = the minimum traffic, the same for every contender (T = B*N tokens, C width, s bytes per "
              "element, V = 512). forward: read the input (ids 8T, or pixels 3T + centres 12V), one wte (or sos) row "
              "per token TCs, each wpe row once NCs (the batch shares positions), the BERT mask T; write h TCs, and "
              "the ids 8T when the input is pixels. backward: read dh TCs and the ids 8T (+ mask T); write dwte VCs, "
              "dwpe NCs (+ dsos Cs for AR). forward+backward = the sum.")


def cli(argv=None):
    profiles = {"gpu": GPU, "cpu": CPU, "quick": QUICK}
    p = make_kernel_parser(__doc__, profiles)
    g = p.add_argument_group("cases")
    g.add_argument("--tokens", type=int, help="B = tokens / N (at least 1)")
    g.add_argument("--resolution", type=int, nargs="+", help="image sides R: N = R^2 tokens")
    g.add_argument("--width", type=int, nargs="+", help="embedding widths C")
    g.add_argument("--dtype", choices=sorted(DTYPES))
    g.add_argument("--input", dest="inputs", nargs="+", choices=("ids", "pixels"), default=["ids", "pixels"])
    g.add_argument("--objective", dest="objectives", nargs="+", choices=("ar", "bert"), default=["ar"],
                   help="ar: SOS shift; bert: 15%% of the tokens masked")
    add_bandwidth_args(p, g, compiled="the eager path")
    args = parse_kernel_args(p, argv, profiles)
    if min(args.tokens, args.copy_mib, *args.resolution, *args.width) < 1:
        p.error("--tokens, --resolution, --width and --copy-mib must be >= 1")
    return args


def batch_of(args, res: int) -> int:
    return max(1, args.tokens // (res * res))


def bytes_moved(b: int, n: int, c: int, elem: int, pixels: bool, ar: bool, pass_: str) -> int:
    t = b * n
    fwd = (3 * t + 12 * V if pixels else 8 * t) + t * c * elem + n * c * elem + (0 if ar else t) + t * c * elem \
        + (8 * t if pixels else 0)
    bwd = t * c * elem + 8 * t + (0 if ar else t) + V * c * elem + n * c * elem + (c * elem if ar else 0)
    return fwd + (bwd if pass_ == "fwd+bwd" else 0)


# ----------------------------------------------------------------------------------------------------------------------
# Contenders: fn(x, wte, wpe, sos) -> h, with the palette and the BERT mask fixed per case


def eager_embedding(x, wte, wpe, sos, bert_mask, palette):
    """The eager `Decoder` input path on given weights: Palette.quantize for pixels, then the ops of Decoder.embed
    (checked against Decoder.embed_input bit for bit in check_case)."""
    ids = palette.quantize(x) if x.dtype == torch.uint8 else x
    pos = wpe[:ids.shape[1]]
    if sos is not None:
        tok = F.embedding(ids[:, :-1], wte)
        return torch.cat([sos.to(tok.dtype).expand(ids.shape[0], 1, -1), tok], dim=1) + pos
    tok = F.embedding(ids, wte)
    if bert_mask is not None:
        tok = tok.masked_fill(bert_mask.unsqueeze(-1), 0.0)
    return tok + pos


def contenders(args, palette: Palette, bert_mask) -> dict:
    ours_label, _ = ours_path("embedding", args.device)
    bump = 0.01 if args.corrupt_for_test else 0.0  # the hidden test flag: ours returns wrong values

    def ours(x, wte, wpe, sos):
        h = palette_embedding(x, wte, wpe, centres=palette.centres, sos=sos, bert_mask=bert_mask)[0]
        return h + bump if bump else h

    def eager(x, wte, wpe, sos):
        return eager_embedding(x, wte, wpe, sos, bert_mask, palette)

    fns = {ours_label: ours, EAGER: eager}
    if args.compile:
        fns[f"{COMPILED_PREFIX}(eager)"] = torch.compile(eager, dynamic=False)
    return fns


def case_tensors(args, b: int, res: int, c: int, pixels: bool, ar: bool, seed: int):
    """(x, wte, wpe, sos or None, bert_mask or None, dh, palette) of one case; the same seed gives the same weights."""
    gen = torch.Generator().manual_seed(seed)
    dtype, device, n = DTYPES[args.dtype], args.device, res * res
    palette = Palette(torch.rand(V, 3, generator=gen) * 2 - 1).to(device)
    if pixels:
        x = torch.randint(0, 256, (b, n, 3), generator=gen, dtype=torch.uint8).to(device)
    else:
        x = torch.randint(0, V, (b, n), generator=gen).to(device)
    wte, wpe, sos = (0.02 * torch.randn(*shape, generator=gen) for shape in ((V, c), (n, c), (c,)))
    wte, wpe, sos = (t.to(dtype).to(device) for t in (wte, wpe, sos))
    bert_mask = None if ar else random_bert_mask((b, n), generator=gen).to(device)
    dh = torch.randn(b, n, c, generator=gen).to(dtype).to(device)
    return x, wte, wpe, sos if ar else None, bert_mask, dh, palette


def check_case(args, res: int, c: int, pixels: bool, ar: bool, backward: bool) -> dict:
    b = min(batch_of(args, res), CHECK_BATCH)
    x, wte, wpe, sos, bert_mask, dh, palette = case_tensors(args, b, res, c, pixels, ar, args.seed)
    case = f"R={res}, C={c}, {'pixels' if pixels else 'ids'}, {'AR' if ar else 'BERT'}, {args.dtype}"
    if pixels:  # the quantize rule, bit for bit
        exact_ids = quantize_reference(x, palette.centres)
        ours_ids = palette_embedding(x, wte, wpe, centres=palette.centres, sos=sos, bert_mask=bert_mask)[1]
        if not (torch.equal(ours_ids, exact_ids) and torch.equal(palette.quantize(x), exact_ids)):
            raise CorrectnessError(f"{case}: ids from pixels differ from the exact quantize rule")
    heads = next(h for h in range(1, c + 1) if c % h == 0 and c // h <= 256)  # any valid config: blocks are unused
    model = Decoder(IGPTConfig(n_layer=1, n_embd=c, n_head=heads, resolution=res, objective="ar" if ar else "bert"))
    model.load_state_dict({**model.state_dict(), "wte.weight": wte, "wpe.weight": wpe,
                           "sos": sos if ar else model.sos.detach()})
    model.to(args.device, DTYPES[args.dtype]).attach_palette(palette)
    with torch.no_grad():
        decoder_h = model.embed_input(None if pixels else x, x if pixels else None, bert_mask)[0]
        if not torch.equal(eager_embedding(x, wte, wpe, sos, bert_mask, palette), decoder_h):
            raise CorrectnessError(f"{case}: the eager contender differs from Decoder.embed_input")

    wrt = (1, 2, 3) if ar else (1, 2)
    grads = [dh] if backward else None

    def reference(x, wte, wpe, sos):
        return palette_embedding_reference(x, wte, wpe, centres=palette.centres, sos=sos, bert_mask=bert_mask)[0]

    exact = run_outputs(reference, [x, wte.double(), wpe.double(), None if sos is None else sos.double()], wrt,
                        [dh.double()] if backward else None)
    plain = run_outputs(reference, [x, wte, wpe, sos], wrt, grads)
    names = ["h"] + (["dwte", "dwpe"] + (["dsos"] if ar else []) if backward else [])
    return check_contenders(case, contenders(args, palette, bert_mask), [x, wte, wpe, sos], wrt, grads, exact, plain,
                            names, "embedding", args.device, compile_skip_reason)


def timed_fns(args, res: int, c: int, pixels: bool, ar: bool, pass_: str, names: list[str]) -> tuple[dict, int]:
    """({name: no-argument callable} on the full-size inputs for the contenders in `names`, bytes moved per call)."""
    b, n = batch_of(args, res), res * res
    backward = pass_ == "fwd+bwd"
    x, wte, wpe, sos, bert_mask, dh, palette = case_tensors(args, b, res, c, pixels, ar, args.seed + 1)
    inputs = [x] + [t.requires_grad_(backward) if t is not None else None for t in (wte, wpe, sos)]
    wrt = (1, 2, 3) if ar else (1, 2)
    fns = {name: timed_call(fn, inputs, wrt, [dh] if backward else None)
           for name, fn in contenders(args, palette, bert_mask).items() if name in names}
    return fns, bytes_moved(b, n, c, wte.element_size(), pixels, ar, pass_)


def time_case(args, res: int, c: int, pixels: bool, ar: bool, pass_: str, runnable: list[str],
              copy_bw: float) -> list[dict]:
    fns, moved = timed_fns(args, res, c, pixels, ar, pass_, runnable)
    b, n = batch_of(args, res), res * res
    rows = []
    for name, m in measure(fns, args.device, args).items():
        row = {"batch": b, "n": n, "width": c, "input": "pixels" if pixels else "ids", "objective": "ar" if ar else
               "bert", "pass": pass_, "dtype": args.dtype, "contender": name, "bytes": moved, **timing_fields(m)}
        if "ms_median" in row:
            row["gb_per_s"] = moved / row["ms_median"] / 1e6
            row["fraction_of_copy_bandwidth"] = row["gb_per_s"] * 1e9 / copy_bw
        rows.append(row)
    speedups(rows, {"eager": EAGER})
    return rows


def table(rows: list[dict]) -> str:
    out = [[f"{r['batch']}x{r['n']}", r["width"], r["input"], r["objective"], r["pass"], r["contender"],
            *([r["ms_median"], r["gb_per_s"], f"{100 * r['fraction_of_copy_bandwidth']:.0f}%",
               fmt_bytes(r["peak_memory_bytes"]), ratio(r["speedup_vs_eager"])]
              if "ms_median" in r else [r["note"], "", "", "", ""])]
           for r in rows]
    return format_table(["BxN", "C", "input", "objective", "pass", "contender", "ms", "GB/s", "% copy BW", "peak mem",
                         "vs eager"], out)


def main(argv=None) -> int:
    args = cli(argv)
    ours_label, _ = ours_path("embedding", args.device)
    log(f"copy bandwidth: x.clone() of {args.copy_mib} MiB")
    copy_bw = copy_bandwidth(args.device, args.copy_mib * 2**20, args)
    backward = "fwd+bwd" in args.passes
    cases = [(res, c, inp == "pixels", obj == "ar") for res in args.resolution for c in args.width
             for inp in args.inputs for obj in args.objectives]
    env, checks, rows, notes = run_kernel_benchmark(
        "embedding.py", args, "embedding", cases, lambda case: check_case(args, *case, backward),
        lambda case, pass_, names: time_case(args, *case, pass_, names, copy_bw),
        lambda case: f"R={case[0]} C={case[1]} {'pixels' if case[2] else 'ids'} {'AR' if case[3] else 'BERT'}")

    print_header(f"palette embedding, {args.dtype}: {ours_label} vs the eager Decoder path"
                 + (" vs torch.compile(eager)" if args.compile else ""), env, args.device, args,
                 f"byte model: {BYTE_MODEL}",
                 f"device copy bandwidth: {copy_bw / 1e9:.1f} GB/s (x.clone() of {args.copy_mib} MiB: read + write)")
    print(f"correctness: before timing, h{' and the gradients' if backward else ''} of every contender on "
          f"{CHECK_BATCH} batch rows agree with the float64 reference (max error <= 2 x plain torch's + atol); ids "
          "from pixels equal the exact quantize rule; the eager contender equals Decoder.embed_input\n")
    print(table(rows))
    for note in notes:
        print(f"not run: {note}")
    save_results(args, "embedding", env, dict(ours=ours_label, byte_model=BYTE_MODEL, vocab=V),
                 copy_bandwidth_bytes_per_s=copy_bw, notes=notes, correctness=checks, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
