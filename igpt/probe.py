"""Linear probe of every layer: `python -m igpt.probe --checkpoint runs/demo --out runs/demo/probe`.

iGPT's claim is about representations: mean-pooled, normed features of an AR-pretrained pixel model classify images
well with a *linear* classifier, best from the middle layers. For each layer l the features are
f^l = mean_t(blocks[l].ln_1(h^l)) (l < L) and f^L = mean_t(ln_f(h^L)), pooled during the forward pass
(`Decoder.features`). A multinomial logistic regression (L-BFGS, L2 penalty chosen on a validation split carved from
the training images) is fitted per layer; train and test accuracy go to a table, DIR/probe.json and DIR/probe.png.
`--compare-random-init` probes the same architecture at random initialisation as well, the baseline that shows what
pretraining added (a random network's pooled features are already a colour histogram of sorts).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from igpt import cli
from igpt.cpu import apply_cpu_speedups, inference_linears
from igpt.model import Decoder
from igpt.train import pick_precision

L2_SWEEP = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
VAL_FRACTION = 0.2


# ----------------------------------------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def extract_features(model: Decoder, images: torch.Tensor, batch_size: int = 32, layers=None,
                     amp_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images [n, R, R, 3] -> fp32 features [n_layers, n, C] of the model (palette attached)."""
    model.eval()
    device = model.wte.weight.device
    amp = amp_dtype != torch.float32
    chunks = []
    with inference_linears(model, amp_dtype if amp else None):  # on CPU: oneDNN linears + in-place GELU (igpt.cpu)
        for s in range(0, images.shape[0], batch_size):
            pixels = images[s:s + batch_size].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                chunks.append(model.features(pixels=pixels, layers=layers).float().cpu())
    return torch.cat(chunks, dim=1)


def cached_features(model: Decoder, images: torch.Tensor, cache_dir: Path | None, key: str, **kw) -> torch.Tensor:
    """extract_features, memoised on disk as safetensors under a key of the weights, palette and images."""
    if cache_dir is None:
        return extract_features(model, images, **kw)
    from safetensors.torch import load_file, save_file

    h = hashlib.sha256((key + repr(sorted(kw.items()))).encode())  # layers and precision change the features
    for t in (*model.state_dict().values(), model.palette.centres, images):
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    path = cache_dir / f"features-{h.hexdigest()[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))["features"]
    feats = extract_features(model, images, **kw)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": feats.contiguous()}, str(tmp))
    tmp.replace(path)
    return feats


# ----------------------------------------------------------------------------------------------------------------------
# Logistic regression


@dataclass
class LinearProbe:
    weight: torch.Tensor  # [n_classes, C] on standardised features
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    l2: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.logits(x).argmax(-1) == y).float().mean().item()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 200) -> LinearProbe:
    """Multinomial logistic regression, mean CE + l2 * ||W||^2 on standardised features, full-batch L-BFGS."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach(), b.detach(), mean, std, l2)


def probe_layer(x_train, y_train, x_test, y_test, n_classes: int, seed: int = 0) -> dict:
    """Choose the L2 penalty on a validation split of the training features, refit on all of them, score."""
    n = x_train.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(n * VAL_FRACTION))
    val, fit = perm[:n_val], perm[n_val:]
    val_acc = {l2: fit_logistic(x_train[fit], y_train[fit], n_classes, l2).accuracy(x_train[val], y_train[val])
               for l2 in L2_SWEEP}
    best_l2 = max(L2_SWEEP, key=lambda l2: (val_acc[l2], l2))  # ties -> the stronger penalty
    probe = fit_logistic(x_train, y_train, n_classes, best_l2)
    return {"train_acc": probe.accuracy(x_train, y_train), "test_acc": probe.accuracy(x_test, y_test),
            "val_acc": val_acc[best_l2], "l2": best_l2}


def probe_all_layers(feats_train, y_train, feats_test, y_test, layers, n_classes: int) -> dict:
    rows = []
    for i, layer in enumerate(layers):
        rows.append({"layer": layer, **probe_layer(feats_train[i], y_train, feats_test[i], y_test, n_classes)})
    best = max(rows, key=lambda r: r["val_acc"])  # chosen on validation data, not on the test set
    return {"layers": rows, "best_layer": best["layer"], "best_test_acc": best["test_acc"]}


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The paper's CIFAR augmentation on uint8 [n, R, R, 3]: zero-pad by `pad`, random crop back to R, random flip."""
    n, R = images.shape[0], images.shape[1]
    padded = F.pad(images.permute(0, 3, 1, 2), (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, n), generator=generator)).tolist()
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, dy[i]:dy[i] + R, dx[i]:dx[i] + R] for i in range(n)])
    out[flip] = out[flip].flip(2)
    return out


def finetune(model: Decoder, x_train, y_train, x_test, y_test, n_classes: int, steps: int, batch_size: int,
             lr: float, seed: int = 0, amp_dtype: torch.dtype = torch.float32, log_every: int = 50) -> dict:
    """Fine-tune every weight plus a new classifier head on L = L_GEN + L_CLF (unweighted, as in the paper).
    The head reads the mean over positions of the final-norm output. Returns train/test accuracy."""
    from igpt.model import random_bert_mask

    cfg = dataclasses.replace(model.cfg, n_classes=n_classes)
    device = model.wte.weight.device
    clf = apply_cpu_speedups(Decoder(cfg).to(device).attach_palette(model.palette))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("clf_head.")}
    state.update({k: v for k, v in clf.state_dict().items() if k.startswith("clf_head.")})
    clf.load_state_dict(state)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    clf.train()
    for step in range(steps):
        idx = torch.randint(0, x_train.shape[0], (batch_size,), generator=g)
        pixels = augment(x_train[idx], g).to(device)
        labels = y_train[idx].to(device)
        ids = clf.palette.quantize(pixels.flatten(1, 2))
        mask = random_bert_mask(ids.shape, generator=g).to(device) if cfg.objective == "bert" else None
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out = clf(ids, bert_mask=mask, return_classes=True)
            gen_logits, gen_targets = (out.logits, ids) if mask is None else (out.logits[mask], ids[mask])
            l_gen = F.cross_entropy(gen_logits.flatten(0, -2).float(), gen_targets.flatten())
            l_clf = F.cross_entropy(out.class_logits.float(), labels)
        (l_gen + l_clf).backward()
        torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"finetune step {step + 1}/{steps}  L_gen {l_gen.item():.4f}  L_clf {l_clf.item():.4f}", flush=True)

    @torch.no_grad()
    def accuracy(x, y) -> float:
        clf.eval()
        correct = 0
        for s in range(0, x.shape[0], batch_size):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                logits = clf(pixels=x[s:s + batch_size].to(device), return_classes=True).class_logits
            correct += (logits.argmax(-1).cpu() == y[s:s + batch_size]).sum().item()
        return correct / x.shape[0]

    return {"train_acc": accuracy(x_train, y_train), "test_acc": accuracy(x_test, y_test), "steps": steps,
            "batch_size": batch_size, "lr": lr}


# ----------------------------------------------------------------------------------------------------------------------
# Data and CLI


def probe_dataset(name: str, resolution: int, n_train: int, n_test: int, seed: int, image_column=None,
                  label_column=None, resize: str = "box"):
    """(train images, train labels, test images, test labels, n_classes): up to n_train / n_test labelled images
    (a seeded subset when the split is larger), centre-cropped at the model's resolution. Any `--dataset` the
    trainer reads: shapes, a hub id, imagefolder:DIR, a save_to_disk DIR (without a test split: a held-out part of
    train)."""
    from igpt.sources import open_source

    kw = dict(seed=seed, image_column=image_column, label_column=label_column, resize=resize)
    splits = []
    for split, n in (("train", n_train), ("test", n_test)):
        source = open_source(name, split, resolution, **kw)
        if source.n_classes is None:
            raise ValueError(f"--dataset {name!r} has no label column, so a probe has nothing to predict; "
                             "name it with --label-column COLUMN, or probe a labelled dataset")
        if len(source) <= n:
            idx = list(range(len(source)))
        else:  # shapes indices are already a random draw; keep them in order so features cache across runs
            g = torch.Generator().manual_seed(seed)
            idx = list(range(n)) if name == "shapes" else torch.randperm(len(source), generator=g)[:n].sort().values.tolist()
        images, labels = source.get(idx, train=False)
        splits += [images, labels]
    return (*splits, source.n_classes)


def format_table(result: dict, baseline: dict | None = None) -> str:
    head = f"{'layer':>5}  {'train':>6}  {'test':>6}  {'l2':>7}"
    if baseline:
        head += f"  {'random-init test':>16}"
    lines = [head]
    base_rows = {r["layer"]: r for r in baseline["layers"]} if baseline else {}
    for r in result["layers"]:
        mark = " *" if r["layer"] == result["best_layer"] else ""
        line = f"{r['layer']:>5}  {r['train_acc']:6.3f}  {r['test_acc']:6.3f}  {r['l2']:7.0e}"
        if baseline:
            line += f"  {base_rows[r['layer']]['test_acc']:16.3f}"
        lines.append(line + mark)
    return "\n".join(lines)


def plot(result: dict, path: Path, baseline: dict | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping probe.png (pip install matplotlib)", flush=True)
        return False
    layers = [r["layer"] for r in result["layers"]]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(layers, [r["test_acc"] for r in result["layers"]], "o-", label="pretrained")
    if baseline:
        ax.plot(layers, [r["test_acc"] for r in baseline["layers"]], "s--", color="gray", label="random init")
    best = next(r for r in result["layers"] if r["layer"] == result["best_layer"])
    ax.plot([best["layer"]], [best["test_acc"]], "*", color="red", markersize=14, label=f"best (layer {best['layer']})")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("linear probe test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir, .safetensors file (with config.json, palette.npy), "
                   "transformers ImageGPT dir or hub id")
    p.add_argument("--dataset", default="shapes",
                   help="shapes (embedded) | hub id | imagefolder:DIR | DIR (save_to_disk), as for training")
    p.add_argument("--image-column", default=None, help="image column of a Hugging Face dataset (default: detected)")
    p.add_argument("--label-column", default=None, help="label column (default: detected)")
    p.add_argument("--resize", default="box", choices=["box", "hf"],
                   help="box: shorter side with a box filter, centre crop (as training); hf: the whole image with "
                   "PIL bilinear, as HF's ImageGPTImageProcessor (for released weights)")
    p.add_argument("--out", default=None, help="output dir (default: CHECKPOINT_DIR/probe; runs/NAME/probe for a hub id)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers to probe (default: all)")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compare-random-init", action="store_true",
                   help="also probe the same architecture at random initialisation")
    p.add_argument("--no-cache", action="store_true", help="do not cache features on disk")
    p.add_argument("--finetune", action="store_true",
                   help="fine-tune the whole model with a classifier head (L_GEN + L_CLF) instead of probing")
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-batch-size", type=int, default=16)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    args = p.parse_args(argv)

    from igpt.sample import load_checkpoint

    model = apply_cpu_speedups(load_checkpoint(args.checkpoint))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    amp_dtype = pick_precision(args.precision, device)
    ckpt = Path(args.checkpoint)
    if args.out:
        out = Path(args.out)
    elif ckpt.exists():
        out = (ckpt if ckpt.is_dir() else ckpt.parent) / "probe"
    else:  # a hub id: no directory of ours to write beside
        out = Path("runs") / ckpt.name / "probe"
    cache = None if args.no_cache else out / "cache"
    layers = args.layers if args.layers else list(range(model.cfg.n_layer + 1))

    x_tr, y_tr, x_te, y_te, n_classes = probe_dataset(args.dataset, model.cfg.resolution, args.n_train,
                                                      args.n_test, args.seed, args.image_column, args.label_column,
                                                      args.resize)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs opened: a failed start leaves no empty dir

    if args.finetune:
        result = finetune(model, x_tr, y_tr, x_te, y_te, n_classes, args.ft_steps, args.ft_batch_size, args.ft_lr,
                          seed=args.seed, amp_dtype=amp_dtype)
        print(f"fine-tuned: train accuracy {result['train_acc']:.3f}, test accuracy {result['test_acc']:.3f} "
              f"(chance {1 / n_classes:.3f})", flush=True)
        (out / "finetune.json").write_text(json.dumps(result, indent=2))
        return result

    def run(m: Decoder, name: str) -> dict:
        t0 = time.time()
        kw = dict(batch_size=args.batch_size, layers=layers, amp_dtype=amp_dtype)
        f_tr = cached_features(m, x_tr, cache, f"{args.dataset}-train-{args.seed}", **kw)
        f_te = cached_features(m, x_te, cache, f"{args.dataset}-test-{args.seed}", **kw)
        t1 = time.time()
        result = probe_all_layers(f_tr, y_tr, f_te, y_te, layers, n_classes)
        print(f"{name}: features {t1 - t0:.0f}s, probes {time.time() - t1:.0f}s", flush=True)
        return result

    result = run(model, "pretrained")
    baseline = None
    if args.compare_random_init:
        torch.manual_seed(args.seed)
        random_model = apply_cpu_speedups(Decoder(model.cfg).to(device).attach_palette(model.palette))
        baseline = run(random_model, "random init")
        result["random_init"] = baseline
    print(format_table(result, baseline))
    summary = (f"best layer {result['best_layer']} of {model.cfg.n_layer}: test accuracy {result['best_test_acc']:.3f} "
               f"(chance {1 / n_classes:.3f})")
    if baseline:
        gap = result["best_test_acc"] - baseline["best_test_acc"]
        summary += f"; random init: {baseline['best_test_acc']:.3f} (layer {baseline['best_layer']}), " \
                   f"pretraining adds {100 * gap:+.1f} points"
    print(summary, flush=True)
    result.update(dataset=args.dataset, n_train=args.n_train, n_test=args.n_test, checkpoint=str(args.checkpoint))
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "probe.png", baseline)
    print(f"wrote {out / 'probe.json'}", flush=True)
    return result


if __name__ == "__main__":
    cli.run(main)
