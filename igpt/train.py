"""Train an iGPT model: `torchrun igpt/train.py --out runs/demo` (also `python -m igpt.train`).

The default trains the tiny preset on the embedded `shapes` dataset, offline, in a few minutes on 2 CPU cores, and
writes RUN_DIR/model.safetensors + config.json + palette.npy (loadable with `Decoder.from_pretrained(RUN_DIR)`) and
RUN_DIR/metrics.jsonl. This is the single-process trainer; FSDP2, activation checkpointing and resumable checkpoints
arrive with the "Training at scale" work.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file (torchrun igpt/train.py): import the package, not igpt/'s siblings
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import math
import time
from pathlib import Path

import torch

from igpt.config import PRESETS, IGPTConfig
from igpt.data import TEST_START, make_shapes
from igpt.model import Decoder, random_bert_mask
from igpt.palette import Palette



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--objective", default="ar", choices=["ar", "bert"])
    p.add_argument("--dataset", default="shapes", help="shapes (embedded, no download)")
    p.add_argument("--palette", default=None, help="palette .npy/.safetensors (default: fit on the training data)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.0, help="the paper uses none (torch's AdamW default: 0.01)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default="runs/demo", help="run directory")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.resolution < 1:
        p.error("--resolution must be >= 1")
    return args


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(choice: str, device: torch.device) -> torch.dtype:
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class ShapesSource:
    """Batches of the embedded dataset; image i is a pure function of (seed, i), so any step can be rebuilt."""

    def __init__(self, resolution: int, seed: int, offset: int = 0):
        self.resolution, self.seed, self.offset = resolution, seed, offset

    def images(self, start: int, n: int) -> torch.Tensor:
        return make_shapes(n, resolution=self.resolution, seed=self.seed, start=self.offset + start)[0]


def make_source(args, split: str):
    if args.dataset != "shapes":
        raise ValueError(f"--dataset {args.dataset!r}: this trainer reads the embedded 'shapes' dataset only; "
                         "Hugging Face datasets (hub id, imagefolder:DIR, save_to_disk DIR) are not wired in yet")
    return ShapesSource(args.resolution, args.seed, offset=TEST_START if split == "test" else 0)


def load_or_fit_palette(args, source) -> Palette:
    if args.palette:
        return Palette.load(args.palette)
    n_images = max(256, 2 ** 16 // args.resolution ** 2)  # >= 64k pixels: plenty for 512 centres
    return Palette.fit(source.images(0, n_images).reshape(-1, 3), n_clusters=512, seed=args.seed)


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("multi-process training (FSDP2) is not implemented yet: run with one process "
                         "(torchrun --nproc_per_node=1 or plain python)")
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = pick_precision(args.precision, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = IGPTConfig.preset(args.preset, resolution=args.resolution, objective=args.objective)
    train_src, eval_src = make_source(args, "train"), make_source(args, "test")
    t0 = time.time()
    palette = load_or_fit_palette(args, train_src)
    print(f"palette: {len(palette)} colours ({time.time() - t0:.1f}s)", flush=True)
    model = Decoder(cfg).to(device).attach_palette(palette)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    print(f"model: {args.preset} {cfg.n_layer}L-{cfg.n_embd} ({model.num_params() / 1e6:.2f}M params), "
          f"{cfg.objective}, {cfg.resolution}x{cfg.resolution} ({cfg.n_ctx} tokens), device {device}, "
          f"precision {str(amp_dtype).removeprefix('torch.')}", flush=True)

    mask_gen = torch.Generator().manual_seed(args.seed)

    def batch(source, step: int, generator=None):
        ids = palette.quantize(source.images(step * args.batch_size, args.batch_size).flatten(1, 2)).to(device)
        mask = None
        if cfg.objective == "bert":
            mask = random_bert_mask(ids.shape, generator=generator if generator is not None else mask_gen).to(device)
        return ids, mask

    def step_loss(ids, mask):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            return model.loss(ids, mask)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        g = torch.Generator().manual_seed(args.seed + 1)  # the same eval masks every time
        losses = [step_loss(*batch(eval_src, i, g)).item() for i in range(args.eval_batches)]
        model.train()
        return sum(losses) / len(losses)

    metrics = open(out / "metrics.jsonl", "w")
    tokens_per_step = args.batch_size * cfg.n_ctx
    t_start = time.time()
    for step in range(args.steps):
        t_step = time.time()
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = step_loss(*batch(train_src, step))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": tokens_per_step / (time.time() - t_step)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record["eval_loss"] = evaluate()
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if (step + 1) % args.log_every == 0 or step == 0 or "eval_loss" in record:
            elapsed = time.time() - t_start
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            line = (f"step {step + 1:>5}/{args.steps}  loss {record['loss']:.4f}  lr {lr:.2e}  "
                    f"{tokens_per_step * (step + 1) / elapsed:,.0f} tok/s  eta {eta:.0f}s")
            if "eval_loss" in record:
                line += f"  eval_loss {record['eval_loss']:.4f}"
            print(line, flush=True)
    metrics.close()
    model.save_pretrained(out)
    print(f"saved {out / 'model.safetensors'}, config.json, palette.npy in {time.time() - t0:.0f}s", flush=True)
    return model


if __name__ == "__main__":
    main()
