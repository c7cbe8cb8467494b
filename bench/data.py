"""Data-loading benchmark: images/s of one decoding worker, and how many workers a GPU needs to keep up.

One worker = this process running `open_source("imagefolder:DIR", ...).get(indices, train=True)` (what each
BatchLoader worker runs: decode, area resize, random crop) over generated JPEGs of ImageNet's typical size (500 x 375,
quality 90, ~62 KiB: smooth waves and sharp-edged ellipses plus noise), with JPEG draft mode (libjpeg's DCT scaling,
the default) and without, at 32, 48 and 64 pixels. Draft-decoded pixels are first compared with full decodes (max and
mean absolute difference after the resize). Then, from igpt.flops (the training FLOP model and data-sheet bf16 peaks),
the images/s one GPU consumes when training each preset at MFU `--mfu` and the workers per GPU that takes.

    python bench/data.py                      # 256 images, 3 timed passes, an H100's peak
    python bench/data.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import env_info, format_table, log, medians, save_results, time_interleaved, warn_if_busy
from igpt.cli import HelpFormatter
from igpt.config import PRESETS, IGPTConfig
from igpt.flops import gpu_bf16_peak, train_flops
from igpt.sources import open_source

FULL = dict(images=256, repeat=3)
QUICK = dict(images=16, repeat=1)
RESOLUTIONS = (32, 48, 64)
PAPER_PRESETS = ("s", "m", "l", "xl")  # the paper trained S, M, L at 32^2 and 48^2, XL at 64^2
IMAGE_SIZE = (500, 375)  # ImageNet's most common size (w x h)


def synthetic_jpeg(seed: int, size: tuple[int, int] = IMAGE_SIZE, quality: int = 90, noise: float = 9.5) -> bytes:
    """A photo-like JPEG: low-frequency colour waves, four sharp-edged ellipses, Gaussian noise (the noise level
    sets the file size: ~62 KiB at 500 x 375, quality 90, like an ImageNet photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3)) + rng.uniform(60, 190, 3)
    for _ in range(6):
        f, phase, amp = rng.uniform(0.5, 4, 2), rng.uniform(0, 2 * np.pi), rng.uniform(10, 40, 3)
        img += amp * np.sin(2 * np.pi * (f[0] * x + f[1] * y) + phase)[..., None]
    for _ in range(4):
        cx, cy, rx, ry = rng.uniform(0, 1), rng.uniform(0, 0.75), *rng.uniform(0.05, 0.25, 2)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        img[inside] = 0.4 * img[inside] + 0.6 * rng.uniform(0, 255, 3)
    img += rng.normal(0, noise, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_imagefolder(root: Path, n: int, seed: int = 0) -> int:
    """n synthetic JPEGs in two class folders under root (imagefolder:root); returns their total bytes."""
    total = 0
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        data = synthetic_jpeg(seed + i)
        (folder / f"{i:05d}.jpg").write_bytes(data)
        total += len(data)
    return total


def draft_differences(full, drafted, n: int) -> dict:
    """Max and mean |drafted - full| of uint8 pixels after the resize, centre and random crops of the same images."""
    out = {}
    for train in (False, True):
        a = full.get(range(n), train=train)[0].int()
        b = drafted.get(range(n), train=train)[0].int()
        diff = (a - b).abs().float()
        out["random_crop" if train else "centre_crop"] = {"max_abs": int(diff.max()), "mean_abs": float(diff.mean())}
    return out


def gpu_images_per_s(cfg: IGPTConfig, peak: float, target_mfu: float) -> float:
    """Images/s a GPU trains on at `target_mfu` of `peak` FLOP/s (the trainer's useful-FLOP model, causal for AR)."""
    return target_mfu * peak / train_flops(cfg, cfg.n_ctx, causal=cfg.causal)


def cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog=f"defaults: {FULL}; --quick: {QUICK}")
    p.add_argument("--images", type=int, help="JPEGs generated and decoded per timed pass")
    p.add_argument("--repeat", type=int, help="timed passes (the median is reported)")
    p.add_argument("--batch", type=int, default=32, help="images per get() call")
    p.add_argument("--resolution", type=int, nargs="+", default=list(RESOLUTIONS))
    p.add_argument("--gpu", default=None, help="GPU whose bf16 peak sets the consumption (igpt.flops names; "
                   "default: this machine's GPU, else H100)")
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation the GPU trains at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few images, 1 timed pass (a smoke test); explicit flags win")
    p.add_argument("--json", type=Path, help="write every setting and number, with the environment, to this JSON file")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.images, args.repeat, args.batch, *args.resolution) < 1 or not 0 < args.mfu <= 1:
        p.error("--images, --repeat, --batch and --resolution must be >= 1 and --mfu in (0, 1]")
    args.gpu = args.gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else "H100")
    if gpu_bf16_peak(args.gpu) is None:
        p.error(f"--gpu {args.gpu!r}: no known bf16 peak (igpt.flops.GPU_BF16_PEAK_TFLOPS); name one listed there")
    return args


def main(argv=None) -> int:
    args = cli(argv)
    torch.set_num_threads(1)  # a DataLoader worker decodes on one core
    env = env_info("cpu")  # before timing: its load average and date describe the start of the run
    warn_if_busy()
    results, checks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        nbytes = write_imagefolder(root, args.images, args.seed)
        log(f"{args.images} JPEGs of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {nbytes / args.images / 1024:.1f} KiB each")
        spec, cache = f"imagefolder:{root}", str(Path(tmp) / "cache")
        for R in args.resolution:
            sources = {mode: open_source(spec, "train", R, seed=args.seed, cache_dir=cache, jpeg_draft=mode == "draft")
                       for mode in ("full", "draft")}
            n = len(sources["full"])
            checks[R] = draft_differences(sources["full"], sources["draft"], n)
            batches = [list(range(s, min(s + args.batch, n))) for s in range(0, n, args.batch)]

            def one_pass(src):
                return lambda: [src.get(b, train=True, epoch=e) for e, b in enumerate(batches)]

            log(f"R={R}: {args.repeat} timed passes over {n} images, full decode and draft interleaved")
            times = time_interleaved({mode: one_pass(src) for mode, src in sources.items()}, 1, args.repeat)
            for mode, s in medians(times).items():
                results.append({"resolution": R, "decode": mode, "images_per_s": n / s, "s_median": s,
                                "s_all": times[mode]})

    peak = gpu_bf16_peak(args.gpu)
    rate = {(r["resolution"], r["decode"]): r["images_per_s"] for r in results}
    needs = []
    for name in PAPER_PRESETS:
        for R in args.resolution:
            cfg = IGPTConfig.preset(name, resolution=R)
            gpu_rate = gpu_images_per_s(cfg, peak, args.mfu)
            needs.append({"preset": name, "resolution": R, "gpu_images_per_s": gpu_rate,
                          **{f"workers_{mode}": math.ceil(gpu_rate / rate[R, mode]) for mode in ("full", "draft")}})

    print(f"Data loading: open_source('imagefolder:...').get(train=True) on {args.images} generated "
          f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs (~{nbytes / args.images / 1024:.0f} KiB), one process, one thread; "
          f"{env['cpu_model']}")
    print("draft vs full decode, uint8 |difference| after the resize (max / mean):")
    print(format_table(["R", "centre crop", "random crop"],
                       [[R, *(f"{c[k]['max_abs']} / {c[k]['mean_abs']:.2f}" for k in ("centre_crop", "random_crop"))]
                        for R, c in checks.items()]))
    print()
    print(format_table(["R", "images/s (full decode)", "images/s (draft)", "draft speed-up"],
                       [[R, rate[R, "full"], rate[R, "draft"], f"{rate[R, 'draft'] / rate[R, 'full']:.2f}x"]
                        for R in args.resolution]))
    print(f"\nworkers per GPU: {args.gpu} ({peak / 1e12:.0f} TFLOP/s bf16) training at MFU {args.mfu:g} "
          f"(igpt.flops.train_flops per image); the paper trained S, M, L at 32^2 and 48^2, XL at 64^2")
    print(format_table(["preset", "R", "GPU images/s", "workers (full decode)", "workers (draft)"],
                       [[r["preset"], r["resolution"], r["gpu_images_per_s"], r["workers_full"], r["workers_draft"]]
                        for r in needs]))
    save_results(args, "data", env, dict(image_size=list(IMAGE_SIZE), mean_jpeg_bytes=nbytes / args.images,
                                         gpu_bf16_peak_flops=peak, torch_threads=1,
                                         worker="open_source('imagefolder:DIR').get(batch, train=True)"),
                 correctness={"draft_vs_full": {str(R): c for R, c in checks.items()}},
                 results=results, workers_per_gpu=needs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
