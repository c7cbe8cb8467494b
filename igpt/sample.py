"""Sample images from a trained model: `python -m igpt.sample --checkpoint runs/demo --out runs/demo/samples.png`.

Unconditional samples by default, in a square-ish grid. With `--prompt-dataset SPEC` (any `--dataset` the trainer
takes: shapes, imagefolder:DIR, a save_to_disk DIR, a hub id) the model completes the first `--prompts` images of its
held-out split, centre-cropped and resized to the model's resolution and quantized with its palette, as in the paper's
figure; the grid has one row per image:

    [prompt: the given --prompt-rows rows (default: the top half), the rest grey] [--n completions] [original]

where the original is the image as the model sees it (quantized to the palette). Tokens are decoded to RGB through
the model's palette. `--no-cache` samples without the KV cache (a full forward over the prefix for every token): the
reference the cached sampler is checked against, the same draws from the same seed (fp32 on CPU).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from igpt import cli
from igpt.cpu import apply_cpu_speedups
from igpt.model import Decoder
from igpt.sampling import Sampler, compile_sampler

UPSCALE = 4  # nearest-neighbour upscaling so 32x32 samples are visible in the grid
GAP = 2  # pixels between tiles
HIDDEN = 128  # grey for the rows of a prompt tile that the model has to complete


def load_checkpoint(path) -> Decoder:
    """Anything Decoder.from_pretrained takes (a run dir, a .safetensors file, a transformers dir, a hub id)."""
    model = Decoder.from_pretrained(path)
    if model.palette is None:
        raise ValueError(f"{path}: no palette.npy beside the weights (or preprocessor_config.json clusters beside HF "
                         "weights), so tokens cannot be decoded to RGB")
    return model


def grid_image(rows: list[list[torch.Tensor]], upscale: int = UPSCALE):
    """rows of uint8 [R, R, 3] tiles -> one PIL image (white gaps)."""
    from PIL import Image

    R = rows[0][0].shape[0] * upscale
    n_cols = max(len(r) for r in rows)
    canvas = torch.full((len(rows) * (R + GAP) - GAP, n_cols * (R + GAP) - GAP, 3), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            big = tile.repeat_interleave(upscale, 0).repeat_interleave(upscale, 1)
            canvas[i * (R + GAP):i * (R + GAP) + R, j * (R + GAP):j * (R + GAP) + R] = big
    return Image.fromarray(canvas.numpy())


def prompt_images(spec: str, n: int, resolution: int, image_column: str | None = None) -> torch.Tensor:
    """The first n images [n, R, R, 3] uint8 of the held-out split of `spec`, opened as the trainer opens it
    (igpt.sources.open_source, its "test" split) with centre crops (train=False)."""
    from igpt.sources import open_source

    source = open_source(spec, "test", resolution, image_column=image_column)
    if n > len(source):
        raise ValueError(f"--prompts {n}: the held-out split of --prompt-dataset {spec} has only {len(source)} "
                         f"images ({source!r}); pass --prompts {len(source)} or fewer")
    return source.get(range(n), train=False)[0]


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir, .safetensors file, transformers ImageGPT dir or hub id")
    p.add_argument("--out", required=True, help="PNG file for the grid")
    p.add_argument("--n", type=int, default=16, help="unconditional samples, or completions per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (1: the model's distribution)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the K most likely tokens only (default: all, the full softmax)")
    p.add_argument("--prompt-dataset", default=None,
                   help="complete held-out images of this dataset: shapes, imagefolder:DIR, a save_to_disk DIR or "
                   "a hub id (as the trainer's --dataset)")
    p.add_argument("--image-column", default=None, help="the image column of --prompt-dataset (default: detected)")
    p.add_argument("--prompts", type=int, default=4, help="number of prompt images with --prompt-dataset "
                   "(the first ones of its held-out split)")
    p.add_argument("--prompt-rows", type=int, default=None,
                   help="pixel rows of each prompt image given to the model, 1..R-1 (default: R // 2, the top half)")
    p.add_argument("--no-cache", action="store_true",
                   help="sample without the KV cache: a full forward over the prefix per token (slow; the reference "
                   "the cached sampler is checked against, the same draws from the same seed)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (igpt.sampling.compile_sampler): about a minute on CPU before the "
                   "first token, then faster per token; worth it for many or large samples")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.prompts < 1:
        p.error("--prompts must be >= 1")
    if args.prompt_rows is not None and args.prompt_dataset is None:
        p.error("--prompt-rows sets how much of each --prompt-dataset image is given: pass --prompt-dataset too")
    if args.compile and args.no_cache:
        p.error("--compile compiles the cached decode step: drop --compile or --no-cache")

    model = apply_cpu_speedups(load_checkpoint(args.checkpoint).eval())
    cfg, palette = model.cfg, model.palette
    R = cfg.resolution
    rows_given = R // 2 if args.prompt_rows is None else args.prompt_rows
    if args.prompt_dataset is not None and not 1 <= rows_given < R:
        p.error(f"--prompt-rows must be in 1..{R - 1} for this {R}x{R} model (at least one row given, at least one "
                f"to complete), got {rows_given}")
    sampler = compile_sampler(model) if args.compile else Sampler(model, use_cache=not args.no_cache)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    if args.prompt_dataset is None:
        tokens = sampler.generate(args.n, temperature=args.temperature, top_k=args.top_k, generator=g)
        images = palette.decode(tokens).reshape(args.n, R, R, 3)
        per_row = max(1, round(args.n ** 0.5))
        rows = [list(images[i:i + per_row]) for i in range(0, args.n, per_row)]
        n_tokens = tokens.numel()
    else:
        ids = palette.quantize(prompt_images(args.prompt_dataset, args.prompts, R, args.image_column).flatten(1, 2))
        given = rows_given * R
        rows, n_tokens = [], 0
        for i in range(args.prompts):
            tokens = sampler.generate(args.n, prompt=ids[i:i + 1, :given], temperature=args.temperature,
                                      top_k=args.top_k, generator=g)
            n_tokens += (tokens.shape[1] - given) * args.n
            original = palette.decode(ids[i]).reshape(R, R, 3)
            prompt_img = original.clone()
            prompt_img[rows_given:] = HIDDEN  # the rows the model has to complete
            completions = palette.decode(tokens).reshape(args.n, R, R, 3)
            rows.append([prompt_img, *completions, original])
    dt = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows).save(out)
    print(f"sampled {n_tokens} tokens in {dt:.1f}s ({n_tokens / dt:,.0f} tokens/s); wrote {out}", flush=True)


if __name__ == "__main__":
    cli.run(main)
