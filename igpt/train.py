"""Train an iGPT model: `torchrun [--nproc_per_node=K] igpt/train.py --out runs/demo` (also `python -m igpt.train`).

The default trains the tiny preset on the embedded `shapes` dataset, offline, in a few minutes on 2 CPU cores.
With K processes (nccl on GPU, gloo on CPU) the model is sharded with FSDP2: `fully_shard` per block, then the root,
after activation checkpointing is applied per block (torchtitan's order, all in `parallelize`). The global batch and
its order do not depend on K: each step reads one global batch from a per-epoch permutation of the dataset and every
rank takes its slice, so K processes follow the 1-process run to fp32 tolerance, and a resume on any K continues it.

The loss is a global sum over the global token count (AR: every token; BERT: the masked ones), so gradient
accumulation and any split across ranks give the same gradient as one big batch.

Run directory:
  metrics.jsonl                 one JSON object per step: step, loss (nats/token), lr, grad_norm, tokens_per_s, ...
  checkpoints/step-N/           resumable DCP checkpoints (`--ckpt-every`, `--keep`; trusted sources only: pickle)
  model.safetensors, config.json, palette.npy   the final weights (`Decoder.from_pretrained(RUN_DIR)`)
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file (torchrun igpt/train.py): import the package, not igpt/'s siblings
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from igpt import checkpoint, cli
from igpt.config import PRESETS, IGPTConfig
from igpt.cpu import apply_cpu_speedups
from igpt.data import BatchLoader, bert_mask_for
from igpt.files import CONFIG_NAME, PALETTE_NAME
from igpt.flops import device_peak_flops, has_native_bf16, mfu
from igpt.model import Decoder, FusedDecoder
from igpt.palette import Palette
from igpt.shapes import shapes_palette
from igpt.sources import open_source

SHAPE_OVERRIDES = ("n_layer", "n_embd", "n_head")  # --n-layer etc.: change one dimension of the preset
# Arguments a resume must agree with: they define the model, the data order and the loss.
RESUME_MUST_MATCH = ("preset", *SHAPE_OVERRIDES, "resolution", "objective", "dataset", "batch_size", "seed")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    for name in SHAPE_OVERRIDES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"{name} instead of the preset's (default: the preset's)")
    p.add_argument("--resolution", type=int, default=16,
                   help="image side: 32, 48, 64 as in the paper (any >= 8; 16 is the CPU demo's)")
    p.add_argument("--objective", default="ar", choices=["ar", "bert"])
    p.add_argument("--dataset", default="shapes",
                   help="shapes (embedded, no download) | hub id | imagefolder:DIR | DIR (a save_to_disk dataset)")
    p.add_argument("--image-column", default=None, help="image column of a Hugging Face dataset (default: detected)")
    p.add_argument("--label-column", default=None, help="label column (default: detected)")
    p.add_argument("--palette", default=None, help="palette .npy/.safetensors (default: fit on the training data; "
                   "shapes has its own fixed palette)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (images per step, over all ranks)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay; the paper uses none (torch's AdamW would use 0.01)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on GPU and on CPUs with native bf16 matmuls (AMX / AVX512-BF16), else fp32")
    p.add_argument("--ac", default="none", help="activation checkpointing per block: none | full | every-K")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (needed for bit-identical resumes on GPU)")
    p.add_argument("--workers", type=int, default=None, help="data decoding processes per rank (default: 0 for "
                   "shapes, 2 otherwise)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=0, help="save a resumable checkpoint every N steps (0: never)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--out", default="runs/demo", help="run directory")
    args = p.parse_args(argv)
    if args.resolution < 8:
        p.error("--resolution must be >= 8 (the paper uses 32, 48, 64)")
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "keep"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.ckpt_every < 0 or args.warmup < 0:
        p.error("--ckpt-every and --warmup must be >= 0")
    try:
        parse_ac(args.ac)
    except ValueError as e:
        p.error(str(e))
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Precision, schedule


def pick_precision(choice: str, device: torch.device) -> torch.dtype:
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if has_native_bf16(device) else torch.float32


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------------------
# Parallelism: activation checkpointing, then FSDP2 per block, then the root — in one place


def parse_ac(mode: str) -> int:
    """'none' -> 0, 'full' -> 1 (every block), 'every-K' -> K (blocks 0, K, 2K, ...)."""
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    if mode.startswith("every-") and mode[6:].isdigit() and int(mode[6:]) >= 1:
        return int(mode[6:])
    raise ValueError(f"--ac must be none, full or every-K with K >= 1 (e.g. every-2), got {mode!r}")


def apply_activation_checkpointing(model: Decoder, mode: str) -> Decoder:
    """Wrap blocks in torch's non-reentrant checkpoint wrapper: only each wrapped block's input is saved in the
    forward pass and its activations are recomputed in the backward. The state_dict keys do not change."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    every = parse_ac(mode)
    if every:
        for i, block in enumerate(model.blocks):
            if i % every == 0:
                model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def parallelize(model: Decoder, *, ac: str, world_size: int, device: torch.device, amp_dtype: torch.dtype) -> Decoder:
    """AC per block -> fully_shard per block -> fully_shard(root). One process: AC only."""
    apply_activation_checkpointing(model, ac)
    if world_size == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # bf16 params for compute on GPU with fp32 gradient reduction; on CPU (gloo) autocast does the casting.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" and amp_dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "loss")  # the trainer calls model.loss(), not forward(): hook it too
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def print(self, *a) -> None:
        if self.main:
            print(*a, flush=True)


def setup_env() -> Env:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(rank, world_size, local_rank, device)


def load_or_fit_palette(args, source, env: Env, out: Path) -> Palette:
    """--palette, else the run dir's palette (a resume), else fit on rank 0 on a sample of the training set and
    broadcast, so every rank quantizes with the same centres."""
    if args.palette:
        return Palette.load(args.palette)
    saved = out / PALETTE_NAME
    if args.resume and saved.exists():
        return Palette.load(saved)
    if args.dataset == "shapes":  # 8 colours, too few for k-means' 512 centres: the dataset ships its palette
        return shapes_palette()
    centres = torch.empty(512, 3)
    if env.main:
        n_images = min(len(source), max(256, 2 ** 16 // args.resolution ** 2))  # >= 64k pixels for 512 centres
        g = torch.Generator().manual_seed(args.seed)
        sample = torch.randperm(len(source), generator=g)[:n_images].sort().values
        pixels = source.get(sample.tolist(), train=False)[0]
        centres = Palette.fit(pixels.reshape(-1, 3), n_clusters=512, seed=args.seed).centres.float()
    if env.world_size > 1:
        centres = centres.to(env.device)
        dist.broadcast(centres, src=0)
    return Palette(centres.cpu())


# ----------------------------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    env = setup_env()
    try:
        model = train(args, env)
        if dist.is_initialized():
            # Leave together: a rank that tears its gloo pairs down while a peer is still saving or finishing the
            # last collective can abort ("terminate called without an active exception"), failing a finished run.
            dist.barrier()
        return model
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """What the step, evaluation, checkpoint and log functions share."""
    args: argparse.Namespace
    env: Env
    cfg: IGPTConfig
    amp_dtype: torch.dtype
    out: Path
    palette: Palette
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    loader: BatchLoader
    eval_loader: BatchLoader

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def train(args, env: Env):
    """Build, resume if asked, run the steps (evaluating, checkpointing and logging as the flags say), publish."""
    if args.batch_size % (env.world_size * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by processes x --grad-accum "
                         f"({env.world_size} x {args.grad_accum})")
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    resume_from = checkpoint.latest(out / "checkpoints") if args.resume else None
    if args.resume and resume_from is None:
        raise SystemExit(f"--resume: no checkpoint in {out / 'checkpoints'} (save some with --ckpt-every N)")
    t0 = time.time()
    with cli.new_dir(out) if env.main else contextlib.nullcontext():  # a failed start leaves no run dir behind
        run = build(args, env, out)
        start_step = 0 if resume_from is None else resume(run, resume_from)
        metrics = open_metrics(run, start_step if resume_from is not None else None)
    peak = device_peak_flops(env.device)
    tokens_per_step = args.batch_size * run.cfg.n_ctx
    t_start, steps_done = time.time(), 0
    for step, images, _, indices in run.loader.iterate(start_step, args.steps):
        t_step = time.time()
        record = train_step(run, step, images, indices)
        seconds = time.time() - t_step
        steps_done += 1
        record["tokens_per_s"] = tokens_per_step / seconds
        if peak:
            record["mfu"] = mfu(run.cfg, tokens_per_step, seconds, peak * env.world_size)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record["eval_loss"] = evaluate(run)
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            save_checkpoint(run, step + 1)
        if (step + 1) % args.log_every == 0 or steps_done == 1 or "eval_loss" in record:
            env.print(log_line(record, args, tokens_per_step * steps_done, time.time() - t_start, steps_done))
    if metrics is not None:
        metrics.close()
    publish(run, t0)
    return run.model


def build(args, env: Env, out: Path) -> Run:
    """Data sources and the palette, the model (parallelized) and its optimizer, the train and eval loaders."""
    device = env.device
    amp_dtype = pick_precision(args.precision, device)
    shape = {k: getattr(args, k) for k in SHAPE_OVERRIDES if getattr(args, k) is not None}
    cfg = IGPTConfig.preset(args.preset, resolution=args.resolution, objective=args.objective, **shape)
    kw = dict(seed=args.seed, image_column=args.image_column, label_column=args.label_column)
    train_src = open_source(args.dataset, "train", args.resolution, **kw)
    eval_src = open_source(args.dataset, "test", args.resolution, **kw)
    workers = args.workers if args.workers is not None else (0 if args.dataset == "shapes" else 2)
    t0 = time.time()
    palette = load_or_fit_palette(args, train_src, env, out)
    if env.main and not (out / PALETTE_NAME).exists():
        palette.save(out / PALETTE_NAME)
    env.print(f"data: {train_src!r}; palette: {len(palette)} colours ({time.time() - t0:.1f}s)")

    torch.manual_seed(args.seed)  # identical initial weights on every rank (and for any number of ranks)
    model_cls = FusedDecoder if device.type == "cuda" else Decoder  # on CPU both run the same torch ops
    model = model_cls(cfg).to(device).attach_palette(palette)
    if device.type == "cpu":
        apply_cpu_speedups(model)  # oneDNN linears: before FSDP wraps the blocks
    n_params = model.num_params()
    model = parallelize(model, ac=args.ac, world_size=env.world_size, device=device, amp_dtype=amp_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    env.print(f"model: {args.preset} {cfg.n_layer}L-{cfg.n_embd} ({n_params / 1e6:.2f}M params), {cfg.objective}, "
              f"{cfg.resolution}x{cfg.resolution} ({cfg.n_ctx} tokens), {env.world_size} process(es) on {device.type}"
              f"{' with FSDP2' if env.world_size > 1 else ''}, precision {str(amp_dtype).removeprefix('torch.')}, "
              f"ac {args.ac}, global batch {args.batch_size} x {args.grad_accum if args.grad_accum > 1 else 1} "
              f"micro-batch(es)")
    ranks = dict(rank=env.rank, world_size=env.world_size, seed=args.seed)
    loader = BatchLoader(train_src, args.batch_size, **ranks, num_workers=workers, train=True)
    eval_loader = BatchLoader(eval_src, args.batch_size, **ranks, train=False)
    return Run(args, env, cfg, amp_dtype, out, palette, model, opt, loader, eval_loader)


# ----------------------------------------------------------------------------------------------------------------------
# One step, evaluation


def tokens_and_masks(run: Run, images, indices, step: int, seed: int):
    ids = run.palette.quantize(images.flatten(1, 2)).to(run.env.device)
    mask = bert_mask_for(indices, step, run.cfg.n_ctx, seed).to(run.env.device) if run.cfg.objective == "bert" else None
    return ids, mask


def loss_sum(run: Run, ids, mask):
    with torch.autocast(run.env.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype != torch.float32):
        return run.model.loss(ids, mask, reduction="sum")


def counted(mask, ids) -> int:
    """Tokens the loss sums over: the masked ones (BERT), else every one."""
    return int(mask.sum()) if mask is not None else ids.numel()


def train_step(run: Run, step: int, images, indices) -> dict:
    """Forward and backward over the micro-batches, clip, AdamW step: the step's metrics (step, loss, lr, grad_norm)."""
    args, env, model, opt = run.args, run.env, run.model, run.opt
    lr = lr_at(step, args)
    for group in opt.param_groups:
        group["lr"] = lr
    ids, mask = tokens_and_masks(run, images, indices, step, args.seed)
    # Global token count first, so that every micro-batch's loss is scaled to the global mean.
    (global_count,) = env.all_sum(counted(mask, ids))
    scale = env.world_size / max(global_count, 1)  # FSDP averages gradients over ranks
    micro = ids.shape[0] // args.grad_accum
    local_sum = 0.0
    for m in range(args.grad_accum):
        part = slice(m * micro, (m + 1) * micro)
        if env.world_size > 1:
            model.set_requires_gradient_sync(m == args.grad_accum - 1)
        loss = loss_sum(run, ids[part], mask[part] if mask is not None else None)
        (loss * scale).backward()
        local_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    (loss_total,) = env.all_sum(local_sum)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    return {"step": step + 1, "loss": loss_total / global_count, "lr": lr, "grad_norm": grad_norm.item()}


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss per counted token over --eval-batches test batches (the same masks every time), all ranks."""
    run.model.eval()
    total = count = 0.0
    for i in range(run.args.eval_batches):
        images, _, idx = run.eval_loader.batch(i)
        ids, mask = tokens_and_masks(run, images, idx, i, run.args.seed + 1)
        total += loss_sum(run, ids, mask).item()
        count += counted(mask, ids)
    run.model.train()
    total, count = run.env.all_sum(total, count)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints, metrics, the final weights


def resume(run: Run, path: Path) -> int:
    """Load model and optimizer state from checkpoint `path` after checking the arguments match; its step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(run.model, run.opt)
    app_state = {"model": msd, "optim": osd}
    saved = checkpoint.load(path, app_state)
    args = run.args
    # an argument a checkpoint did not record (saved before its flag existed) had the flag's default, None
    mismatched = {k: (saved["args"].get(k), getattr(args, k)) for k in RESUME_MUST_MATCH
                  if saved["args"].get(k) != getattr(args, k)}
    if mismatched:
        raise SystemExit(f"--resume: {path} was saved with different arguments "
                         + ", ".join(f"--{k.replace('_', '-')} {a!r} (now {b!r})" for k, (a, b) in
                                     mismatched.items()) + "; rerun with the saved values or a new --out")
    set_state_dict(run.model, run.opt, model_state_dict=app_state["model"], optim_state_dict=app_state["optim"])
    run.env.print(f"resumed from {path} at step {saved['step']}")
    return saved["step"]


def save_checkpoint(run: Run, step: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(run.model, run.opt)
    trainer_state = {"world_size": run.env.world_size, "args": {k: getattr(run.args, k) for k in RESUME_MUST_MATCH}}
    path = checkpoint.save(run.ckpt_root, step, {"model": msd, "optim": osd}, trainer_state, keep=run.args.keep,
                           extra_files={CONFIG_NAME: lambda p: p.write_text(run.cfg.to_json()),
                                        PALETTE_NAME: run.palette.save})
    run.env.print(f"checkpoint {path}")


def open_metrics(run: Run, resumed_at: int | None):
    """metrics.jsonl for appending on rank 0 (None elsewhere); a resume drops what was logged after its checkpoint."""
    if not run.env.main:
        return None
    path = run.out / "metrics.jsonl"
    keep_lines = []
    if resumed_at is not None and path.exists():
        keep_lines = [line for line in path.read_text().splitlines()
                      if line.strip() and json.loads(line)["step"] <= resumed_at]
    path.write_text("".join(line + "\n" for line in keep_lines))
    return open(path, "a")


def log_line(record: dict, args, tokens: int, elapsed: float, steps_done: int) -> str:
    """The live line: step, loss, lr, tokens/s since start (`tokens` in `elapsed` s), MFU, ETA, eval loss."""
    line = (f"step {record['step']:>5}/{args.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{tokens / elapsed:,.0f} tok/s")
    if "mfu" in record:
        line += f"  mfu {record['mfu']:.1%}"
    line += f"  eta {elapsed / steps_done * (args.steps - record['step']):.0f}s"
    if "eval_loss" in record:
        line += f"  eval_loss {record['eval_loss']:.4f}"
    return line


def publish(run: Run, t0: float) -> None:
    """Gather the full state dict and write safetensors + config.json + palette.npy from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.env.main:
        final = Decoder(run.cfg).attach_palette(run.palette)
        final.load_state_dict(full)
        final.save_pretrained(run.out)
        print(f"saved {run.out / 'model.safetensors'}, config.json, palette.npy in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    cli.run(main)
