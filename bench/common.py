"""Shared helpers for the benchmarks: environment info, timing, precision, same-weight model pairs, correctness checks,
tables and JSON (the FLOP model and the GPU peaks: igpt.flops). Scripts in bench/ import this as `common` (their own
folder is on sys.path)."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
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
from igpt.cli import HelpFormatter
from igpt.cpu import apply_cpu_speedups, onednn_linear, onednn_supports
from igpt.convert import hf_config_kwargs, hf_input_ids, to_hf
from igpt.flops import PRECISION_DTYPES as DTYPES, cpu_bf16_flags, gpu_bf16_peak, has_native_bf16  # noqa: F401

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


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def gpu_info() -> dict | None:
    """Name, compute capability, SM count, memory, driver and CUDA version of the current GPU (None without one)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": nvidia_driver(), "cuda": torch.version.cuda}


def env_info(device: torch.device | str | None = None) -> dict:
    """Where and with what a benchmark ran. `device` is the device benchmarked (default: the GPU when there is one)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "gpu": gpu_info(),
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
        # IGPT_GIT_SHA: for copies of the tree without .git (the device tool's); git_dirty is then unknown (None)
        "git_sha": _git("rev-parse", "HEAD") or os.environ.get("IGPT_GIT_SHA"),
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
        return ["fp32", "bf16"] if has_native_bf16("cuda" if torch.cuda.is_available() else "cpu") else ["fp32"]
    return [choice]


def autocast(precision: str, device: torch.device | str | None = None):
    """fp32: plain; bf16: torch.autocast on the model's device (weights stay fp32, matmuls run in bf16). The device
    defaults to the GPU when there is one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16)


def train_step_fn(model, loss_fn, ids, precision: str, *loss_args):
    """One training step on the fixed batch: zero_grad, forward + loss (autocast in bf16), backward, AdamW step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = ids.device

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = loss_fn(model, ids, *loss_args)
        loss.backward()
        opt.step()

    return step


def matmul_peak(precision: str, n: int = 4096, warmup: int = 1, repeat: int = 3) -> float:
    """Measured FLOP/s of an n x n x n matmul in this precision (bf16 tensors for bf16, as autocast runs it): the
    faster of torch.matmul and, where oneDNN runs the dtype on this CPU, oneDNN's packed-weight linear (fp32 torch.matmul is MKL's
    sgemm, which oneDNN beats ~1.4x on AMD CPUs)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    fns = [lambda: torch.matmul(a, b)]
    if onednn_supports(dtype):  # not bf16 on AVX2-only CPUs: oneDNN's bf16 reorder needs AVX-512 or AVX-NE-CONVERT
        linear = onednn_linear(b.t().contiguous())  # linear(a, b^T) = a @ b
        fns.append(lambda: linear(a))
    with torch.no_grad():  # the oneDNN linear is inference only
        return max(2 * n**3 / timeit(fn, warmup, repeat) for fn in fns)


# ----------------------------------------------------------------------------------------------------------------------
# Models with the same weights


def build_pair(cfg: IGPTConfig, seed: int = 0):
    """Our `Decoder` and HF `ImageGPTForCausalImageModeling` holding the same weights (dropout 0 on the HF side).

    The reference initialisation zeroes lm_head and sets every norm gain to 1, which would make a logit comparison
    trivially pass; both are randomised so that the check sees every parameter."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(seed)
    ours = apply_cpu_speedups(Decoder(cfg))
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
# Command line, tables, JSON


def make_parser(doc: str, full: dict, quick: dict) -> argparse.ArgumentParser:
    """The flags every script shares (sizes, precision, --sample-tokens, --quick, --json); a script adds its own and
    then calls `parse_args`. Size flags default to None so that `parse_args` can fill them from `full` or `quick`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter,
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
    return ", ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in values.items())


def settings(args, **extra) -> dict:
    """The command line's values for the JSON (the hidden test flag left out), plus `extra`."""
    values = {k: (str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v) for k, v in vars(args).items()
              if k != "corrupt_for_test"}
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


# ----------------------------------------------------------------------------------------------------------------------
# Kernel benchmarks (attention.py, norm.py, embedding.py, train.py): device, timing, memory, correctness, command line

# The accuracy rule of the kernel tests (FlashAttention's): against a float64 reference on the same rounded inputs, an
# output's max error may be at most twice that of plain torch computing the same thing in the same dtype, plus atol.
KERNEL_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CPU_BANNER = ("*** CPU run: the Triton GPU kernels are NOT timed here. On CPU tensors 'ours' runs igpt_kernels' "
              "plain-torch reference path (or, under TRITON_INTERPRET=1, the Triton interpreter: checked for "
              "correctness, never timed). These numbers describe PyTorch on this CPU, not the kernels; GPU numbers "
              "come only from a CUDA machine (bench/results/<device>/). ***")


def ours_path(op: str, device: torch.device) -> tuple[str, bool]:
    """(label, timed) of igpt_kernels' `op` ("attention", "norm", "embedding") on `device`: what really runs there
    (igpt_kernels' own dispatch decides), and whether timing it means anything (the interpreter's speed does not)."""
    import igpt_kernels

    backend = igpt_kernels.backend(op, device)
    if backend != "torch":
        return ("ours (Triton)", True) if backend == "triton" else ("ours (Triton interpreter)", False)
    if device.type == "cuda":
        return "ours (torch reference: triton missing)", True
    return "ours (CPU reference path)", True


def launch_count(op: str) -> int:
    """Triton launches of igpt_kernels' `op` so far (all its kernels): a check that the kernel really ran."""
    return sum(importlib.import_module(f"igpt_kernels.{op}").launch_counts.values())


def time_fns(fns: dict, device: torch.device, args) -> tuple[dict[str, list[float]], dict[str, str]]:
    """(seconds of every timed call per name, {name: reason} for those that could not run, e.g. out of memory).

    CUDA: `triton.testing.do_bench` per function - warm-up for args.warmup_ms, then timed calls for args.rep_ms, each
    timed with CUDA events after the L2 cache is flushed (a 256 MB buffer is zeroed between calls). CPU: `warmup`
    untimed calls, then `repeat` calls timed with time.perf_counter, contenders interleaved (no cache flush)."""
    if device.type != "cuda":
        return time_interleaved(fns, args.warmup, args.repeat), {}
    from triton.testing import do_bench

    times, failed = {}, {}
    for name, fn in fns.items():
        try:
            times[name] = [ms / 1e3 for ms in do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="all")]
        except torch.cuda.OutOfMemoryError:
            failed[name] = "out of memory"
        torch.cuda.empty_cache()
    return times, failed


def timing_method(device: torch.device, args) -> str:
    if device.type == "cuda":
        return (f"triton.testing.do_bench: {args.warmup_ms} ms of warm-up, then calls for {args.rep_ms} ms, each timed "
                "with CUDA events after an L2 flush; the median is reported")
    return (f"time.perf_counter: {args.warmup} warm-up call(s), then the median of {args.repeat} timed calls, "
            "contenders interleaved; no cache flush")


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak bytes allocated during one call of fn above what was allocated before it (outputs and workspace included;
    the inputs are not): torch.cuda.max_memory_allocated. None on CPU, where it is not measured."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def copy_bandwidth(device: torch.device, nbytes: int, args) -> float:
    """Measured device copy bandwidth in bytes/s: x.clone() of an nbytes fp32 tensor reads and writes nbytes each."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    times, _ = time_fns({"copy": x.clone}, device, args)
    return 2 * x.numel() * 4 / statistics.median(times["copy"])


def check_close(what: str, got: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor) -> float:
    """Max |got - exact|, where exact is the float64 reference and plain the same reference in got's dtype; raises
    CorrectnessError when got is not finite or its error exceeds 2 x plain's + KERNEL_ATOL[dtype] x max(1, max
    |exact|) (the atol scales with large values, such as a weight gradient summed over many rows, as in the norm
    tests: a different summation order is not an error)."""
    if got.shape != exact.shape:
        raise CorrectnessError(f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}")
    if not torch.isfinite(got).all():
        raise CorrectnessError(f"{what}: non-finite values (NaN or inf)")
    err = (got.double() - exact).abs().max().item()
    base = (plain.double() - exact).abs().max().item()
    atol = (KERNEL_ATOL[plain.dtype] if plain.dtype in KERNEL_ATOL else 0.0) * max(1.0, exact.abs().max().item())
    if not err <= 2 * base + atol:
        raise CorrectnessError(f"{what}: max error {err:.3g} against the float64 reference > 2 x plain torch's "
                               f"{base:.3g} + atol {atol:g}")
    return err


def make_kernel_parser(doc: str, profiles: dict[str, dict]) -> argparse.ArgumentParser:
    """Flags every kernel benchmark shares; a script adds its own with default None, and `parse_kernel_args` fills
    them from `profiles["gpu"]`, `["cpu"]` (by device) or `["quick"]` (--quick)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="\n".join(f"{name} defaults: {_flags(v)}" for name, v in profiles.items()))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, help="CPU: untimed calls before timing")
    g.add_argument("--repeat", type=int, help="CPU: timed calls (the median is reported)")
    g.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warm-up time")
    g.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench timing time (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 timed call (a smoke test); explicit flags win")
    p.add_argument("--json", type=Path, help="write every setting and number, with the environment, to this JSON file")
    p.add_argument("--corrupt-for-test", action="store_true", help=argparse.SUPPRESS)  # proves the checks fail loudly
    return p


def add_bandwidth_args(parser: argparse.ArgumentParser, cases, compiled: str) -> None:
    """Flags of the memory-bound kernel benchmarks (norm, embedding): which passes, whether torch.compile of the
    eager path (`compiled` names it) is a contender, and the size of the copy that measures the device bandwidth."""
    cases.add_argument("--pass", dest="passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    cases.add_argument("--no-compile", dest="compile", action="store_false",
                       help=f"leave out torch.compile of {compiled} (compiling takes seconds per size on CPU)")
    parser.add_argument("--copy-mib", type=int, help="size of the copy that measures the device bandwidth")


def parse_kernel_args(parser: argparse.ArgumentParser, argv, profiles: dict[str, dict]) -> argparse.Namespace:
    """Parse; resolve --device to a torch.device; fill unset flags from the profile (quick, gpu or cpu)."""
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                               "cpu" if args.device == "auto" else args.device)
    args.profile = "quick" if args.quick else "gpu" if args.device.type == "cuda" else "cpu"
    for key, value in profiles[args.profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("warmup", "repeat", "warmup_ms", "rep_ms"):
        if getattr(args, key) is not None and getattr(args, key) < (0 if "warmup" in key else 1):
            parser.error(f"--{key.replace('_', '-')} must be >= {0 if 'warmup' in key else 1}")
    return args


def device_line(env: dict) -> str:
    """One line: the device benchmarked and the software versions."""
    gpu = env.get("gpu")
    if env["device"] != "cpu" and gpu:
        where = (f"{gpu['name']} ({gpu['capability']}, {gpu['sm_count']} SMs, {gpu['memory_gib']} GiB), "
                 f"driver {gpu['driver']}, CUDA {gpu['cuda']}")
    else:
        where = f"CPU: {env['cpu_model']}, {env['torch_threads']} torch threads"
    return f"{where}; torch {env['torch']}, triton {env['triton']}; git {str(env['git_sha'])[:12]}"


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def run_outputs(fn, inputs: list, wrt: tuple[int, ...], grad_outs: list | None) -> list[torch.Tensor]:
    """fn(*inputs)'s outputs (a tensor or a tuple of them), then, when grad_outs is given, the gradients of the inputs
    at positions `wrt` (torch.autograd.grad on fresh leaves)."""
    leaves = [t.detach().requires_grad_(grad_outs is not None and i in wrt) if t is not None else None
              for i, t in enumerate(inputs)]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if grad_outs is None:
        return [o.detach() for o in outs]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, [leaves[i] for i in wrt], grad_outs))


def timed_call(fn, inputs: list, wrt: tuple[int, ...], grad_outs: list | None):
    """A no-argument callable for timing: fn's forward, or forward + backward (autograd.grad with grad_outs, so no
    .grad accumulates) when grad_outs is given. Inputs at `wrt` must already require grad for the backward."""
    if grad_outs is None:
        return lambda: fn(*inputs)

    def forward_backward():
        outs = fn(*inputs)
        return torch.autograd.grad(list(outs) if isinstance(outs, (tuple, list)) else [outs],
                                   [inputs[i] for i in wrt], grad_outs)
    return forward_backward


def check_contenders(case: str, fns: dict, inputs: list, wrt: tuple[int, ...], grad_outs: list | None,
                     exact: list, plain: list, names: list[str], op: str, device: torch.device,
                     skip_reason=lambda name, error: None) -> dict:
    """Every contender's outputs (and gradients) against the float64 reference `exact`, with `plain` (the reference
    in the contenders' dtype) setting the error budget (see check_close). Returns {name: {what: max error}}, or
    {name: "skipped: reason"} where skip_reason(name, error) accepts the RuntimeError a contender raised. Raises
    CorrectnessError on any disagreement, and when 'ours (Triton)' did not launch igpt_kernels' `op` kernels."""
    report = {}
    for name, fn in fns.items():
        launches = launch_count(op)
        try:
            got = run_outputs(fn, inputs, wrt, grad_outs)
        except RuntimeError as e:
            reason = skip_reason(name, e)
            if reason is None:
                raise
            report[name] = f"skipped: {reason}"
            continue
        if name.startswith("ours (Triton") and launch_count(op) == launches:
            raise CorrectnessError(f"{case}, {name}: the Triton kernel did not run")
        if len(got) != len(names):
            raise CorrectnessError(f"{case}, {name}: {len(got)} outputs and gradients, expected {len(names)}")
        report[name] = {what: check_close(f"{case}, {name}: {what}", g, e, p)
                        for what, g, e, p in zip(names, got, exact, plain)}
    return report


def measure(fns: dict, device: torch.device, args) -> dict[str, dict]:
    """{name: {"s_median", "s_all", "peak_memory_bytes"}} of each no-argument callable, or {name: {"note": reason}}
    when it could not run (out of GPU memory). One untimed call first, so that autotuning and allocator caches do
    not count as peak memory; then peak memory (CUDA), then the timing (time_fns)."""
    memory, failed = {}, {}
    for name, fn in fns.items():
        try:
            fn()
            memory[name] = peak_memory(fn, device)
        except torch.cuda.OutOfMemoryError:
            failed[name] = "out of memory"
            torch.cuda.empty_cache()
    times, oom = time_fns({name: fn for name, fn in fns.items() if name not in failed}, device, args)
    failed.update(oom)
    return {name: ({"s_median": statistics.median(times[name]), "s_all": times[name],
                    "peak_memory_bytes": memory.get(name)} if name in times else {"note": failed[name]})
            for name in fns}


def timing_fields(measured: dict) -> dict:
    """A row's timing fields (milliseconds) from one entry of `measure`, or its note when it could not run."""
    if "s_median" not in measured:
        return {"note": measured["note"]}
    return {"ms_median": measured["s_median"] * 1e3, "ms_all": [t * 1e3 for t in measured["s_all"]],
            "peak_memory_bytes": measured["peak_memory_bytes"]}


def speedups(rows: list[dict], baselines: dict[str, str]) -> None:
    """Add `speedup_vs_<key>` (baseline time / row time; > 1 = faster) to every timed row, for each baseline
    contender name in `baselines` {key: name} that was timed among these rows."""
    ms = {r["contender"]: r["ms_median"] for r in rows if "ms_median" in r}
    for r in rows:
        if "ms_median" in r:
            for key, name in baselines.items():
                r[f"speedup_vs_{key}"] = ms[name] / r["ms_median"] if name in ms else None


def ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


COMPILED_PREFIX = "torch.compile"


def compile_skip_reason(name: str, error: RuntimeError) -> str | None:
    """A torch.compile contender that fails to compile here (no C++ compiler, an unsupported op) is skipped, with the
    first line of the reason; everything else is a real failure."""
    if name.startswith(COMPILED_PREFIX):
        return f"torch.compile failed: {str(error).strip().splitlines()[0][:160] if str(error).strip() else error!r}"
    return None


def print_header(title: str, env: dict, device: torch.device, args, *lines: str) -> None:
    """The banner on CPU, the title, where it ran, `lines`, and how it was timed."""
    if device.type == "cpu":
        print(CPU_BANNER + "\n")
    print(title)
    print(device_line(env))
    for line in lines:
        print(line)
    print(f"timing: {timing_method(device, args)}; peak memory: " +
          ("torch.cuda.max_memory_allocated during one call, above the inputs" if device.type == "cuda" else
           "not measured on CPU (n/a)"))


def run_kernel_benchmark(script: str, args, op: str, cases: list, check, time_case, label) -> tuple[dict, dict, list,
                                                                                                      list[str]]:
    """The flow every kernel benchmark shares: the environment; the correctness check of every case before anything
    is timed (a failure exits non-zero with the reason); then each case and pass (args.passes) timed.

    check(case) -> {contender: {output: max error} or "skipped: reason"}; time_case(case, pass_, names) -> rows;
    label(case) -> a short name for logs and notes. Returns (env, {label: check report}, rows, not-run notes)."""
    env = env_info(args.device)  # before timing: its load average and date describe the start of the run
    if args.device.type == "cpu":
        warn_if_busy()
    _, ours_timed = ours_path(op, args.device)
    log(f"correctness: {len(cases)} cases, every contender vs the float64 reference")
    try:
        checks = {case: check(case) for case in cases}
    except CorrectnessError as e:
        sys.exit(f"{script}: correctness check FAILED, nothing timed: {e}")
    rows = []
    for case in cases:
        ran = [name for name, r in checks[case].items() if isinstance(r, dict)]
        runnable = [name for name in ran if ours_timed or not name.startswith("ours")]
        for pass_ in args.passes:
            log(f"timing {label(case)} {pass_}: {len(runnable)} contenders")
            rows += time_case(case, pass_, runnable)
    where: dict = {}
    for case, report in checks.items():
        for name, r in report.items():
            untimed = isinstance(r, dict) and name.startswith("ours") and not ours_timed
            if untimed or not isinstance(r, dict):
                where.setdefault((name, "checked, not timed (interpreter)" if untimed else r), []).append(label(case))
    notes = [f"{name}: {reason} ({'every case' if len(found) == len(cases) else ', '.join(found)})"
             for (name, reason), found in where.items()]
    return env, {label(case): report for case, report in checks.items()}, rows, notes
