"""Training-step benchmark: tokens/s and model FLOPs utilisation (MFU) of `Decoder` (eager: SDPA, torch norm and
embedding) vs `FusedDecoder` (our kernels), with and without activation checkpointing, for a preset and resolution.

A step is zero_grad + forward + loss + backward + AdamW step on one fixed batch (bf16 autocast where it applies, weights
in fp32). MFU = useful FLOPs per step / step time / peak, with igpt.flops.FLOP_MODEL: activation-checkpoint recompute is
not useful work, so a checkpointed step does the same useful work in more time. The peak is the data-sheet dense bf16
peak of a known GPU (else "unknown"), or on CPU the measured torch.matmul peak in the step's precision.

Correctness first: all variants start from the same weights, and on one batch their fp32 losses and every gradient
must agree with the eager Decoder's without checkpointing (and the losses in the timed precision too); otherwise the
script exits non-zero before timing. On a CPU-only machine it runs with a banner: FusedDecoder then runs the kernels'
CPU reference paths, not Triton.

    python bench/train.py                            # GPU: preset s at 32^2, batch 16, bf16; CPU: tiny at 16^2, batch 8
    python bench/train.py --preset l --resolution 48 --batch 4 --ac none full every-2 --json out.json
"""
from __future__ import annotations

import sys

import torch

from common import (LOSS_RTOL, CorrectnessError, autocast, env_info, fmt_bytes, format_table, log, make_kernel_parser,
                    matmul_peak, measure, ours_path, parse_kernel_args, print_header, ratio, save_results, speedups,
                    timing_fields, train_step_fn, warn_if_busy)
from igpt import Decoder, FusedDecoder, IGPTConfig
from igpt.config import PRESETS
from igpt.cpu import apply_cpu_speedups
from igpt.flops import FLOP_MODEL, gpu_bf16_peak, has_native_bf16, matmul_params, mfu, train_flops
from igpt.model import random_bert_mask

GPU = dict(preset="s", resolution=32, batch=16, precision="bf16", matmul_size=0)
CPU = dict(preset="tiny", resolution=16, batch=8, precision="auto", matmul_size=4096, warmup=1, repeat=3)
QUICK = dict(preset="tiny", resolution=4, batch=2, precision="fp32", matmul_size=256, warmup=1, repeat=1)
GRAD_RTOL = 1e-4  # fp32: |g - g_eager| / |g_eager| per parameter (Frobenius norms)
LOSS_RTOL_FP32 = 1e-5


def cli(argv=None):
    profiles = {"gpu": GPU, "cpu": CPU, "quick": QUICK}
    p = make_kernel_parser(__doc__, profiles)
    p.set_defaults(warmup_ms=500, rep_ms=3000)  # a training step takes tens to hundreds of ms on a GPU
    g = p.add_argument_group("model and step")
    g.add_argument("--preset", choices=sorted(PRESETS))
    g.add_argument("--resolution", type=int, help="images are R x R: N = R^2 tokens")
    g.add_argument("--objective", choices=("ar", "bert"), default="ar")
    g.add_argument("--batch", type=int, help="images per step")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="bf16 = autocast, weights in fp32; auto = bf16 on CUDA or a CPU with native bf16, else fp32")
    g.add_argument("--models", nargs="+", choices=("decoder", "fused"), default=["decoder", "fused"])
    g.add_argument("--ac", nargs="+", default=["none", "full"], metavar="MODE",
                   help="activation checkpointing modes: none, full, every-K (every K-th block)")
    p.add_argument("--matmul-size", type=int, help="CPU: n of the n x n x n matmul that measures the peak")
    args = parse_kernel_args(p, argv, profiles)
    if args.precision == "auto":
        args.precision = "bf16" if has_native_bf16(args.device) else "fp32"
    for mode in args.ac:
        if not (mode in ("none", "full") or (mode.startswith("every-") and mode[6:].isdigit() and int(mode[6:]) > 0)):
            p.error(f"--ac {mode}: expected none, full or every-K with K >= 1")
    if min(args.resolution, args.batch) < 1:
        p.error("--resolution and --batch must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing


def _checkpoint_blocks(model, mode: str) -> None:
    """Local stand-in for igpt.train.apply_activation_checkpointing: torch's non-reentrant checkpoint wrapper around
    every block ("full") or every K-th block ("every-K"), in place."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    if mode == "none":
        return
    every = 1 if mode == "full" else int(mode.split("-", 1)[1])
    for i in range(0, len(model.blocks), every):
        model.blocks[i] = checkpoint_wrapper(model.blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def activation_checkpointing():
    """(apply(model, mode), where it comes from): the trainer's own when it has one, else the local stand-in."""
    try:
        from igpt.train import apply_activation_checkpointing
    except ImportError:
        return _checkpoint_blocks, "bench/train.py stand-in (igpt.train.apply_activation_checkpointing is missing)"
    return apply_activation_checkpointing, "igpt.train.apply_activation_checkpointing"


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and peak


def peak_flops(args, env: dict) -> tuple[float | None, str]:
    """(FLOP/s or None, where it comes from)."""
    if args.device.type == "cuda":
        if args.precision != "bf16":
            return None, "unknown: data-sheet peaks are listed for bf16 only"
        peak = gpu_bf16_peak(env["device"])
        return peak, (f"data-sheet dense bf16 peak of {env['device']}" if peak else
                      f"unknown: {env['device']} is not in igpt.flops.GPU_BF16_PEAK_TFLOPS")
    log(f"matmul peak ({args.matmul_size}^3, {args.precision})")
    peak = matmul_peak(args.precision, args.matmul_size)
    return peak, f"measured torch.matmul {args.matmul_size}^3, {args.precision}"


# ----------------------------------------------------------------------------------------------------------------------
# Variants and correctness


def reference_state(cfg: IGPTConfig, seed: int) -> dict:
    """Decoder weights with a random lm_head and random norm gains (the reference init zeroes the one and sets the
    other to 1, which would hide differences in them)."""
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.02)
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
                p.add_(0.1 * torch.randn_like(p))
    return model.state_dict()


def variants(args, cfg: IGPTConfig, state: dict, apply_ac) -> dict:
    """{name: model} for every --models x --ac, all holding `state`, on the device, checkpointing applied."""
    fused_label = ours_path("attention", args.device)[0].replace("ours", "FusedDecoder")
    labels = {"decoder": "Decoder (eager)", "fused": fused_label}
    out = {}
    for kind in args.models:
        for mode in args.ac:
            model = (Decoder if kind == "decoder" else FusedDecoder)(cfg)
            model.load_state_dict(state)
            if kind == "fused" and args.corrupt_for_test:  # the hidden test flag: one weight differs
                with torch.no_grad():
                    model.blocks[0].mlp.fc.weight[0, 0] += 1.0
            model.to(args.device)
            if model.wte.weight.device.type == "cpu":
                apply_cpu_speedups(model)
            apply_ac(model, mode)
            out[f"{labels[kind]}, AC {mode}"] = model
    return out


def build(args, cfg: IGPTConfig):
    """(variants {name: model}, ids [B, N], BERT mask or None, where activation checkpointing comes from)."""
    apply_ac, ac_source = activation_checkpointing()
    models = variants(args, cfg, reference_state(cfg, args.seed), apply_ac)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, cfg.n_ctx), generator=gen).to(args.device)
    bert_mask = random_bert_mask(ids.shape, generator=gen).to(args.device) if cfg.objective == "bert" else None
    return models, ids, bert_mask, ac_source


def loss_fn(model, ids, bert_mask):
    return model.loss(ids, bert_mask=bert_mask)


def loss_and_grads(model, ids, bert_mask) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids, bert_mask)
    loss.backward()
    grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad.detach().clone()
             for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def check_variants(models: dict, ids, bert_mask, precision: str, device) -> dict:
    """Every variant's fp32 loss and gradients against the first variant's (the eager Decoder without checkpointing
    when it is measured), and its loss in the timed precision. Returns the losses; raises CorrectnessError."""
    names = list(models)
    base_loss, base_grads = loss_and_grads(models[names[0]], ids, bert_mask)
    with torch.no_grad(), autocast(precision, device):
        base_timed = loss_fn(models[names[0]], ids, bert_mask).item()
    report = {}
    for name in names:
        loss, grads = loss_and_grads(models[name], ids, bert_mask)
        if not abs(loss - base_loss) <= LOSS_RTOL_FP32 * abs(base_loss):
            raise CorrectnessError(f"{name}: fp32 loss {loss:.7f} vs {base_loss:.7f} of {names[0]}")
        if set(grads) != set(base_grads):
            raise CorrectnessError(f"{name}: gradients for {sorted(set(grads) ^ set(base_grads))} differ in presence")
        worst = max((torch.linalg.vector_norm(grads[k].double() - g.double()) /
                     max(torch.linalg.vector_norm(g.double()).item(), 1e-30)).item() for k, g in base_grads.items())
        if not worst <= GRAD_RTOL:
            raise CorrectnessError(f"{name}: gradients differ from {names[0]}'s by {worst:.2e} (relative) > "
                                   f"{GRAD_RTOL:g}")
        with torch.no_grad(), autocast(precision, device):
            timed = loss_fn(models[name], ids, bert_mask).item()
        if not abs(timed - base_timed) <= LOSS_RTOL[precision] * abs(base_timed):
            raise CorrectnessError(f"{name}: {precision} loss {timed:.6f} vs {base_timed:.6f} of {names[0]}")
        report[name] = {"loss_fp32": loss, f"loss_{precision}": timed, "grad_max_rel_diff": worst}
    return report


def time_variants(args, models: dict, ids, bert_mask) -> dict:
    """`measure` of each variant's training step. CPU: all together, interleaved. CUDA: one variant at a time, so that
    only one AdamW's states are allocated at once (for the large presets they do not all fit)."""
    def step(model):
        return train_step_fn(model, loss_fn, ids, args.precision, bert_mask)

    if args.device.type != "cuda":
        return measure({name: step(model) for name, model in models.items()}, args.device, args)
    measured = {}
    for name, model in models.items():
        measured.update(measure({name: step(model)}, args.device, args))
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return measured


def table(rows: list[dict]) -> str:
    out = [[r["contender"], *([r["ms_median"], r["tokens_per_s"], r["tflops"],
                             "unknown" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                             fmt_bytes(r["peak_memory_bytes"]), ratio(r["speedup_vs_decoder"])]
                            if "ms_median" in r else [r["note"], "", "", "", "", ""])]
           for r in rows]
    return format_table(["variant", "ms/step", "tokens/s", "useful TFLOP/s", "MFU", "peak mem", "vs Decoder"], out)


def main(argv=None) -> int:
    args = cli(argv)
    cfg = IGPTConfig.preset(args.preset, resolution=args.resolution, objective=args.objective)
    env = env_info(args.device)
    if args.device.type == "cpu":
        warn_if_busy()
    _, ours_timed = ours_path("attention", args.device)
    notes = []
    if not ours_timed and "fused" in args.models:  # the interpreter: minutes per step, and no speed to learn
        args.models = [m for m in args.models if m != "fused"]
        notes.append("FusedDecoder: not run under the Triton interpreter (tests/interpret checks its numerics)")
    if not args.models:
        sys.exit("train.py: nothing to run (FusedDecoder is not run under TRITON_INTERPRET=1)")
    models, ids, bert_mask, ac_source = build(args, cfg)
    log(f"correctness: {len(models)} variants, fp32 losses and gradients, and {args.precision} losses")
    try:
        correctness = check_variants(models, ids, bert_mask, args.precision, args.device)
    except CorrectnessError as e:
        sys.exit(f"train.py: correctness check FAILED, nothing timed: {e}")

    tokens = args.batch * cfg.n_ctx
    n_matmul, flops = matmul_params(cfg), train_flops(cfg, tokens, causal=cfg.causal)
    log(f"timing {len(models)} variants")
    measured = time_variants(args, models, ids, bert_mask)
    peak, peak_source = peak_flops(args, env)
    rows = []
    for name, m in measured.items():
        row = {"contender": name, **timing_fields(m)}
        if "ms_median" in row:
            step = row["ms_median"] / 1e3
            row.update(tokens_per_s=tokens / step, tflops=flops / step / 1e12,
                       mfu=mfu(cfg, tokens, step, peak))
        rows.append(row)
    base = next((name for name in models if name.startswith("Decoder") and name.endswith("AC none")), None)
    speedups(rows, {"decoder": base})

    fused_note = "" if args.device.type == "cuda" else " (FusedDecoder runs the kernels' CPU reference paths here)"
    print_header(f"training step, {args.precision}: Decoder vs FusedDecoder, with and without activation "
                 f"checkpointing{fused_note}", env, args.device, args,
                 f"model: preset {args.preset} ({cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads), "
                 f"{cfg.objective}, N = {cfg.n_ctx} ({cfg.resolution}^2), batch {args.batch} = {tokens} tokens/step; "
                 f"AdamW(lr 1e-4); activation checkpointing: {ac_source}",
                 f"FLOP model: {FLOP_MODEL}",
                 f"  = {flops / 1e9:.2f} GFLOP per step (P = {n_matmul:,}); MFU peak: "
                 + (f"{peak / 1e12:.3g} TFLOP/s, {peak_source}" if peak else peak_source))
    print(f"correctness: before timing, every variant's fp32 loss (rtol {LOSS_RTOL_FP32:g}) and gradients "
          f"(relative {GRAD_RTOL:g}) and its {args.precision} loss (rtol {LOSS_RTOL[args.precision]:g}) agree with "
          f"{next(iter(models))}'s\n")
    print(table(rows))
    for note in notes:
        print(f"not run: {note}")
    save_results(args, "train", env, dict(config=cfg.to_dict(), n_ctx=cfg.n_ctx, tokens_per_step=tokens,
                                          optimizer="AdamW(lr=1e-4)", activation_checkpointing=ac_source),
                 flop_model=FLOP_MODEL, useful_flops_per_step=flops, matmul_params=n_matmul,
                 peak_flop_per_s=peak, peak_source=peak_source, notes=notes, correctness=correctness, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
