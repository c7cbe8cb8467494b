"""Shared helpers for the benchmarks: environment info, timing, precision, same-weight model pairs, correctness checks,
the FLOP model, tables and JSON. Scripts in bench/ import this as `common` (their own folder is on sys.path)."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from igpt import Decoder, IGPTConfig
from igpt.convert import hf_config_kwargs, hf_input_ids, to_hf

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
LOGIT_ATOL = {"fp32": 1e-4}  # logits are compared in fp32 only: bf16 op orders differ legitimately
LOSS_RTOL = {"fp32": 1e-5, "bf16": 2e-2}


_START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout), with seconds since start."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


class CorrectnessError(RuntimeError):
    """Our model and the peer disagree: nothing may be timed."""


# ----------------------------------------------------------------------------------------------------------------------
# Environment


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 CPU features present (AMX tiles, AVX512-BF16); empty where bf16 matmul is emulated."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return sorted(flags & {"amx_bf16", "avx512_bf16"})


def warn_if_busy() -> None:
    """CPU timings are only meaningful on an otherwise idle machine: say so when it is not."""
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        log(f"warning: load average {os.getloadavg()[0]:.1f} - other processes are using the CPU, "
            "timings will be noisy (small ops suffer most: busy OpenMP threads wait for a core)")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken installs are reported as None, never fatal for a benchmark
        return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_info() -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # others using the CPU?
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Timing and precision


def time_interleaved(fns: dict, warmup: int = 1, repeat: int = 3) -> dict[str, list[float]]:
    """Seconds of each timed call of every fn, after `warmup` untimed calls of each. The timed calls alternate
    (a, b, a, b, ...) so that a change in background load hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def timeit(fn, warmup: int = 1, repeat: int = 3) -> float:
    """Median seconds of fn() over `repeat` timed calls after `warmup` untimed ones."""
    return statistics.median(time_interleaved({"fn": fn}, warmup, repeat)["fn"])


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def resolve_precisions(choice: str) -> list[str]:
    """auto: fp32, plus bf16 where the CPU (or a GPU) has native bf16 matmuls; otherwise exactly what was asked."""
    if choice == "both":
        return list(PRECISIONS)
    if choice == "auto":
        native = torch.cuda.is_available() or bool(cpu_bf16_flags())
        return ["fp32", "bf16"] if native else ["fp32"]
    return [choice]


def autocast(precision: str):
    """fp32: plain; bf16: torch.autocast on the model's device (weights stay fp32, matmuls run in bf16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def matmul_peak(precision: str, n: int = 4096, warmup: int = 1, repeat: int = 3) -> float:
    """Measured FLOP/s of an n x n x n torch.matmul in this precision (bf16 tensors for bf16, as autocast runs it)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    return 2 * n**3 / timeit(lambda: torch.matmul(a, b), warmup, repeat)


# ----------------------------------------------------------------------------------------------------------------------
# Models with the same weights


def build_pair(cfg: IGPTConfig, seed: int = 0):
    """Our `Decoder` and HF `ImageGPTForCausalImageModeling` holding the same weights (dropout 0 on the HF side).

    The reference initialisation zeroes lm_head and sets every norm gain to 1, which would make a logit comparison
    trivially pass; both are randomised so that the check sees every parameter."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(seed)
    ours = Decoder(cfg)
    with torch.no_grad():
        ours.lm_head.weight.normal_(std=0.02)
        for name, p in ours.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.add_(0.1 * torch.randn_like(p))
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(**hf_config_kwargs(cfg)))
    hf.load_state_dict(to_hf(ours), strict=True)
    return ours, hf


def random_ids(cfg: IGPTConfig, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.n_ctx), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """HF logits aligned with ours: position t predicts ids[:, t] (HF input is SOS + ids[:, :-1])."""
    return hf(hf_input_ids(ids, hf.config.vocab_size - 1)).logits


def hf_generate(hf, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """HF's cached sampler completing `prompt` (our ids [B, P]) with `new_tokens` tokens: returns SOS + P + new ids.
    top_k=0 switches off HF's default top-k of 50, so it samples the full softmax at temperature 1 as ours does."""
    V = hf.config.vocab_size - 1
    sos = torch.full((prompt.shape[0], 1), V, dtype=prompt.dtype, device=prompt.device)
    sos_prompt = torch.cat([sos, prompt], dim=1)
    return hf.generate(sos_prompt, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=V)


def check_logits(ours, hf, ids: torch.Tensor, atol: float = LOGIT_ATOL["fp32"]) -> float:
    """Max |logit difference| of the two models in fp32 eval mode; raises CorrectnessError above atol."""
    modes = ours.training, hf.training
    ours.eval(), hf.eval()
    try:
        with torch.no_grad():
            a, b = ours(ids).float(), hf_logits(hf, ids).float()
    finally:
        ours.train(modes[0]), hf.train(modes[1])
    if a.shape != b.shape:
        raise CorrectnessError(f"logit shapes differ: ours {tuple(a.shape)} vs HF {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise CorrectnessError(f"logits differ by {diff:.3e} > {atol:.0e} (fp32): the models do not hold the "
                               "same weights or compute different functions")
    return diff


# ----------------------------------------------------------------------------------------------------------------------
# FLOP model

FLOP_MODEL = ("training FLOPs/step = 6 * P * B * N + 12 * L * N^2 * C * B, where P = parameters in matmuls (all "
              "except the wte/wpe/sos embeddings and norm gains; lm_head included), B batch, N tokens, L layers, "
              "C width; the attention term counts the full N x N score matrix (no causal halving), as in PaLM "
              "(Chowdhery et al. 2022, app. B) and nanoGPT's estimate_mfu")


def matmul_params(model: Decoder) -> int:
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and not name.startswith(("wte.", "wpe.")))


def train_flops(model: Decoder, batch: int) -> float:
    cfg = model.cfg
    N = cfg.n_ctx
    return 6 * matmul_params(model) * batch * N + 12 * cfg.n_layer * N**2 * cfg.n_embd * batch


# ----------------------------------------------------------------------------------------------------------------------
# Command line, tables, JSON


def make_parser(doc: str, full: dict, quick: dict) -> argparse.ArgumentParser:
    """The flags every script shares (sizes, precision, --sample-tokens, --quick, --json); a script adds its own and
    then calls `parse_args`. Size flags default to None so that `parse_args` can fill them from `full` or `quick`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="defaults: " + _flags(full) + "\n--quick:  " + _flags(quick))
    g = p.add_argument_group("model and batch (HF gets the same weights)")
    g.add_argument("--layers", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--batch", type=int)
    g.add_argument("--resolution", type=int, help="images are R x R: N = R^2 tokens")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                   help="auto = fp32, plus bf16 autocast when the CPU has native bf16 (amx_bf16 / avx512_bf16)")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-tokens", type=int, help="new tokens sampled per image after a prompt of N - S tokens")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 timed repeat (a smoke test); "
                   "explicit flags still win")
    p.add_argument("--json", type=Path, help="write every setting and number to this JSON file")
    p.add_argument("--corrupt-for-test", action="store_true", help=argparse.SUPPRESS)  # proves the checks fail loudly
    return p


def parse_args(parser: argparse.ArgumentParser, argv, full: dict, quick: dict) -> argparse.Namespace:
    """Parse; every flag left unset takes its value from `quick` under --quick, else from `full`; check ranges."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in full:
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key.replace('_', '-')} must be >= {0 if key == 'warmup' else 1}")
    n_ctx = args.resolution ** 2
    if args.sample_tokens > n_ctx:
        parser.error(f"--sample-tokens must be at most N = resolution^2 = {n_ctx}, got {args.sample_tokens}")
    return args


def _flags(values: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())


def settings(args, **extra) -> dict:
    """The command line's values for the JSON (the hidden test flag left out), plus `extra`."""
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "corrupt_for_test"}
    return {**values, **extra}


def config_from_args(args) -> IGPTConfig:
    return IGPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, resolution=args.resolution)


def describe(cfg: IGPTConfig, batch: int, env: dict) -> str:
    """Two header lines: where it ran, and the model and batch."""
    return (f"{env['cpu_model'] if env['device'] == 'cpu' else env['device']}, {env['torch_threads']} threads, "
            f"torch {env['torch']}, transformers {env['transformers']}\n"
            f"model: {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, N = {cfg.n_ctx} "
            f"({cfg.resolution}^2), batch {batch}")


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def save_results(args, benchmark: str, env: dict, settings_extra: dict, **sections) -> None:
    """With --json PATH: write the benchmark's name, environment, settings and `sections`, and say where."""
    if args.json:
        env = {**env, "load_average_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        write_json(args.json, {"benchmark": benchmark, "env": env, "settings": settings(args, **settings_extra),
                               **sections})
        print(f"\nwrote {args.json}")


def write_json(path: Path, data: dict) -> None:
    """Write atomically (temp file + os.replace), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
