"""Sample images from a trained model: `python -m igpt.sample --checkpoint runs/demo --out runs/demo/samples.png`.

Unconditional samples by default; with `--prompt-dataset shapes` each row shows the top half of a held-out image
(the prompt), `--n` completions of it, and the original. Tokens are decoded to RGB through the model's palette.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from igpt.cpu import apply_cpu_speedups
from igpt.model import Decoder
from igpt.sampling import Sampler, compile_sampler

UPSCALE = 4  # nearest-neighbour upscaling so 32x32 samples are visible in the grid
GAP = 2  # pixels between tiles


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir or .safetensors file")
    p.add_argument("--out", required=True, help="PNG file for the grid")
    p.add_argument("--n", type=int, default=16, help="unconditional samples, or completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--prompt-dataset", default=None, help="'shapes': complete the top half of held-out images")
    p.add_argument("--prompts", type=int, default=4, help="number of prompt images with --prompt-dataset")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (igpt.sampling.compile_sampler): about a minute on CPU before the "
                   "first token, then faster per token; worth it for many or large samples")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")

    model = apply_cpu_speedups(load_checkpoint(args.checkpoint).eval())
    sampler = compile_sampler(model) if args.compile else Sampler(model)
    cfg, palette = model.cfg, model.palette
    R = cfg.resolution
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    if args.prompt_dataset is None:
        tokens = sampler.generate(args.n, temperature=args.temperature, top_k=args.top_k, generator=g)
        images = palette.decode(tokens).reshape(args.n, R, R, 3)
        per_row = max(1, round(args.n ** 0.5))
        rows = [list(images[i:i + per_row]) for i in range(0, args.n, per_row)]
        n_tokens = tokens.numel()
    else:
        if args.prompt_dataset != "shapes":
            raise ValueError(f"--prompt-dataset {args.prompt_dataset!r}: only 'shapes' is supported so far")
        from igpt.shapes import make_shapes

        originals = make_shapes(args.prompts, resolution=R, seed=args.seed + 7919)[0]  # not the training seed
        ids = palette.quantize(originals.flatten(1, 2))
        half = (R // 2) * R
        rows, n_tokens = [], 0
        for i in range(args.prompts):
            tokens = sampler.generate(args.n, prompt=ids[i:i + 1, :half], temperature=args.temperature,
                                    top_k=args.top_k, generator=g)
            n_tokens += (tokens.shape[1] - half) * args.n
            prompt_img = palette.decode(ids[i]).reshape(R, R, 3).clone()
            prompt_img[R // 2:] = 0  # black out the part the model has to complete
            completions = palette.decode(tokens).reshape(args.n, R, R, 3)
            rows.append([prompt_img, *completions, originals[i]])
    dt = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows).save(out)
    print(f"sampled {n_tokens} tokens in {dt:.1f}s ({n_tokens / dt:,.0f} tokens/s); wrote {out}", flush=True)


if __name__ == "__main__":
    main()
