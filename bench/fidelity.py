"""The paper's representation findings in miniature on real photographs, through the project's own commands.

  1. probe accuracy vs depth: an AR-pretrained model's linear probe on every layer against the same architecture at
     random initialisation (the paper's Figure 3: the curve rises, then falls; the best layer is not the last);
  2. better generative model, better features: checkpoints along training, each one's held-out loss against its
     best-layer probe accuracy (Figure 4);
  3. AR vs BERT at the same size and steps: best-layer probe accuracy (BERT probes worse before fine-tuning);
  4. completions of held-out images, top half given, from the final AR model (a PNG grid).

Data: a labelled image folder, by default CIFAR-10's 10,000 test images (`../shared/data/cifar10-test`, JPEGs). The
split is fixed: in each class's sorted file list every 5th file (index % 5 == 4) is held out. The held-out fifth is
the probe's test set, the held-out loss's and the completions' images; the rest pretrains both models and fits the
probes (the L2 penalty and the best layer are chosen on a validation part of it, never on the test set). Everything
runs in fp32 with fixed seeds, so reruns on any CPU give the same numbers up to float reassociation.

    python bench/fidelity.py --out bench/results/<machine>/fidelity     # the study (tens of minutes on 2 cores)
    python bench/fidelity.py --quick --data DIR --out /tmp/fidelity      # a smoke run of the whole pipeline
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from common import env_info, log, write_json

from igpt import cli
from igpt.model import Decoder, random_bert_mask
from igpt.probe import main as probe_main
from igpt.sample import main as sample_main
from igpt.sources import open_source
from igpt.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-test"
HELD_OUT_EVERY = 5  # file index % 5 == 4 -> held out
FULL = dict(resolution=16, n_layer=8, n_embd=128, n_head=4, steps=600, batch_size=32, checkpoints=4,
            n_train=8000, n_test=2000, prompts=8, completions=4)
QUICK = dict(resolution=8, n_layer=3, n_embd=32, n_head=2, steps=8, batch_size=8, checkpoints=2,
             n_train=80, n_test=20, prompts=2, completions=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image folder DIR/CLASS/*.{jpg,png} to split")
    p.add_argument("--out", required=True, help="results directory (JSON, figures, the runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    for key, value in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"(default: {value}, quick "
                       f"{QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps % args.checkpoints:
        p.error(f"--steps {args.steps} must be a multiple of --checkpoints {args.checkpoints}")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# data


def split_folder(src: Path, dst: Path) -> dict:
    """Copy src/CLASS/* into dst/{train,test}/CLASS/: per class, sorted by name, every HELD_OUT_EVERY-th file held out."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir()) if src.is_dir() else []
    if not classes:
        raise SystemExit(f"--data {src}: expected a folder of class folders (DIR/CLASS/*.jpg); CIFAR-10's test images "
                         "as an image folder are at ../shared/data/cifar10-test")
    done = dst / "split.json"
    if done.exists():
        info = json.loads(done.read_text())
        if info["source"] == str(src):
            return info
    counts = {"train": 0, "test": 0}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in classes:
        for i, f in enumerate(sorted(p for p in (src / name).iterdir() if p.is_file())):
            split = "test" if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, tmp / split / name / f.name)
            counts[split] += 1
    info = {"source": str(src), "classes": classes, "images": counts,
            "rule": f"per class, sorted by file name: index % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1} is held out"}
    (tmp / "split.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)  # complete or absent: a killed split is redone, never half-used
    return info


# ----------------------------------------------------------------------------------------------------------------------
# the steps


def checkpoint_steps(args) -> list[int]:
    every = args.steps // args.checkpoints
    return [every * (k + 1) for k in range(args.checkpoints)]


def pretrain(args, spec: str, objective: str, run: Path) -> float:
    """Train one model with igpt.train, a step-N checkpoint at each of checkpoint_steps(args); the wall time."""
    every = checkpoint_steps(args)[0]
    t0 = time.time()
    train_main(["--dataset", spec, "--resolution", str(args.resolution), "--n-layer", str(args.n_layer),
                "--n-embd", str(args.n_embd), "--n-head", str(args.n_head), "--objective", objective,
                "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--warmup", str(max(1, every // 2)),
                "--ckpt-every", str(every), "--keep", str(args.checkpoints), "--eval-every", str(every),
                "--log-every", str(every), "--workers", "0", "--precision", "fp32", "--seed", str(args.seed),
                "--out", str(run)])
    return time.time() - t0


def held_out_images(spec: str, args) -> torch.Tensor:
    """The first --n-test held-out images, centre-cropped: uint8 [n, R, R, 3]."""
    source = open_source(spec, "test", args.resolution)
    return source.get(range(min(args.n_test, len(source))), train=False)[0]


@torch.no_grad()
def held_out_loss(checkpoint: Path, images: torch.Tensor, seed: int) -> float:
    """Mean loss in nats per counted token over the held-out images (BERT: the loss on its masked tokens under one
    fixed mask draw)."""
    model = Decoder.from_pretrained(checkpoint).eval()
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(images), 100):
        ids = model.palette.quantize(images[start:start + 100]).flatten(1)
        mask = random_bert_mask(ids.shape, generator=g) if model.cfg.objective == "bert" else None
        total += model.loss(ids, mask, reduction="sum").item()
        count += ids.numel() if mask is None else int(mask.sum())
    return total / count


def probe(args, spec: str, checkpoint: Path, out: Path, random_init: bool = False) -> dict:
    """igpt.probe on every layer: its result (per-layer val/test accuracy, the best layer chosen on validation)."""
    argv = ["--checkpoint", str(checkpoint), "--dataset", spec, "--n-train", str(args.n_train), "--n-test",
            str(args.n_test), "--precision", "fp32", "--seed", str(args.seed), "--no-cache", "--out", str(out)]
    return probe_main(argv + (["--compare-random-init"] if random_init else []))


def best(result: dict) -> dict:
    return next(r for r in result["layers"] if r["layer"] == result["best_layer"])


def summary_of(result: dict) -> dict:
    b = best(result)
    return {"best_layer": b["layer"], "best_val_acc": b["val_acc"], "best_test_acc": b["test_acc"],
            "last_layer_test_acc": result["layers"][-1]["test_acc"],
            "layers": [{k: r[k] for k in ("layer", "val_acc", "test_acc", "l2")} for r in result["layers"]]}


# ----------------------------------------------------------------------------------------------------------------------
# figures


def new_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.2))


def save_figure(fig, ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depth(results: dict, path: Path) -> None:
    fig, ax = new_figure()
    for key, label, style in (("ar", "AR-pretrained", "o-"), ("random_init", "random init (same architecture)", "s--"),
                              ("bert", "BERT-pretrained", "^-")):
        r = results[key]["probe"]
        ax.plot([x["layer"] for x in r["layers"]], [100 * x["test_acc"] for x in r["layers"]], style, label=label)
        ax.plot([r["best_layer"]], [100 * r["best_test_acc"]], "*", ms=16, color=ax.lines[-1].get_color(),
                markeredgecolor="black")
    ax.axhline(100 / len(results["split"]["classes"]), color="grey", lw=0.8, ls=":", label="chance")
    ax.plot([], [], "*", ms=12, color="white", markeredgecolor="black", label="best layer (chosen on validation)")
    ax.set_xlabel("layer (0 = embeddings, L = final norm)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title(f"Probe accuracy vs depth, {results['settings']['resolution']}² held-out images")
    save_figure(fig, ax, path)


def plot_loss_vs_probe(results: dict, path: Path) -> None:
    points = results["ar"]["checkpoints"]
    fig, ax = new_figure()
    x = [p["held_out_bits_per_dim"] for p in points]
    y = [100 * p["probe"]["best_test_acc"] for p in points]
    ax.plot(x, y, "o-", label="AR checkpoints (best layer, chosen on validation)")
    for p, xi, yi in zip(points, x, y):
        ax.annotate(f"step {p['step']}", (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.invert_xaxis()  # better generative model to the right
    ax.set_xlabel("held-out loss (bits per sub-pixel; lower is better →)")
    ax.set_ylabel("best-layer linear probe test accuracy (%)")
    ax.set_title("Better generative model, better features")
    save_figure(fig, ax, path)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"  # the split and the runs: large, not committed
    wall = {}
    t0 = time.time()
    split = split_folder(Path(args.data).expanduser(), work / "data")
    spec = f"imagefolder:{work / 'data'}"
    wall["split_s"] = time.time() - t0
    log(f"split: {split['images']} ({split['rule']})")

    runs = {"ar": work / "ar", "bert": work / "bert"}
    for objective, run in runs.items():
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: the numbers must come from these settings
        wall[f"pretrain_{objective}_s"] = pretrain(args, spec, objective, run)

    t0 = time.time()
    images = held_out_images(spec, args)
    steps = checkpoint_steps(args)
    checkpoints = []
    for step in steps:
        ckpt = runs["ar"] / "checkpoints" / f"step-{step}"
        result = probe(args, spec, ckpt, work / "probe" / f"ar-step-{step}", random_init=step == steps[-1])
        nats = held_out_loss(ckpt, images, args.seed)
        checkpoints.append({"step": step, "held_out_nats_per_token": nats,
                            "held_out_bits_per_dim": nats / math.log(2) / 3, "probe": summary_of(result)})
        log(f"AR step {step}: held-out {nats:.4f} nats/token, best layer {result['best_layer']} "
            f"test acc {result['best_test_acc']:.4f}")
    random_init = summary_of(result["random_init"])
    wall["probe_ar_s"] = time.time() - t0

    t0 = time.time()
    bert_ckpt = runs["bert"] / "checkpoints" / f"step-{steps[-1]}"
    bert = {"probe": summary_of(probe(args, spec, bert_ckpt, work / "probe" / "bert")),
            "held_out_masked_nats_per_token": held_out_loss(bert_ckpt, images, args.seed), "step": steps[-1]}
    wall["probe_bert_s"] = time.time() - t0

    t0 = time.time()
    sample_main(["--checkpoint", str(runs["ar"]), "--prompt-dataset", spec, "--prompts", str(args.prompts),
                 "--n", str(args.completions), "--seed", str(args.seed), "--out", str(out / "completions.png")])
    wall["sample_s"] = time.time() - t0
    wall["total_s"] = sum(wall.values())

    settings = {k: getattr(args, k) for k in ("seed", "quick", *FULL)}
    results = {"benchmark": "fidelity", "env": env_info("cpu"), "settings": {**settings, "precision": "fp32"},
               "split": split, "wall": wall,
               "ar": {"checkpoints": checkpoints, "probe": checkpoints[-1]["probe"]},
               "random_init": {"probe": random_init},
               "bert": bert, "completions": "completions.png (rows: prompt with its bottom half hidden, "
                                            f"{args.completions} completions, the original quantized)"}
    results["ar"]["best_layer_gain_over_random_init"] = (checkpoints[-1]["probe"]["best_test_acc"]
                                                         - random_init["best_test_acc"])
    write_json(out / "fidelity.json", results)
    plot_depth(results, out / "probe_vs_depth.png")
    plot_loss_vs_probe(results, out / "loss_vs_probe.png")
    log(f"wrote {out / 'fidelity.json'}, probe_vs_depth.png, loss_vs_probe.png, completions.png "
        f"({wall['total_s'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    cli.run(main)
