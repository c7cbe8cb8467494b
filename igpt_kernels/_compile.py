"""Ahead-of-time compilation of the Triton kernels for sm_80 (A100) and sm_90 (H100), on a machine without a GPU.

    python -m igpt_kernels._compile                  # every config of every kernel, both targets: the table below
    python -m igpt_kernels._compile --specialisations   # every specialisation (dtype, head dim, ...) at one config
    python -m igpt_kernels._compile --full --kernel attention.fwd --target 90 --jobs 2

Per compiled kernel the table shows shared memory (triton's metadata), registers and spill bytes (the bundled ptxas
run with -v on the PTX), which MMA instruction the dots lowered to (`wgmma` on sm_90, `mma` = mma.sync, `-` = none,
e.g. fp32 dots at IEEE precision run on FMA units) and whether the code contains atomics.

Registry: `_compile_registry.entries()` lists a KernelEntry per kernel (a new kernel adds its entries there).
Entries are built on demand, so `import igpt_kernels` imports neither this module nor triton; triton is imported only
by the functions that compile.
"""
from __future__ import annotations

import argparse
import contextlib
import concurrent.futures
import functools
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

TARGETS = (80, 90)
# Opt-in maximum shared memory per block: A100 163 KiB, H100 227 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: constexpr tile sizes plus warps and pipeline stages."""

    meta: tuple  # ((name, value), ...) constexpr tile parameters, e.g. (("BLOCK_M", 128), ("BLOCK_N", 64))
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap passed to ptxas (.maxnreg); None: ptxas decides

    @property
    def label(self) -> str:
        tiles = " ".join(f"{k.replace('BLOCK_', 'B')}={v}" for k, v in self.meta)
        cap = f" r{self.maxnreg}" if self.maxnreg else ""
        return f"{tiles} w{self.num_warps} s{self.num_stages}{cap}"

    def meta_dict(self) -> dict:
        return dict(self.meta)


def spec_label(spec: Mapping) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items())


@dataclass(frozen=True)
class KernelEntry:
    """How to compile one kernel ahead of time.

    kernel():               the @triton.jit function (not an autotuner wrapper); imports triton lazily.
    arguments(spec, cfg):   {arg name: value} for every kernel parameter. Strings are runtime types
                            ("*fp16" pointer, 16-byte aligned; "i32"; "i32:16" int divisible by 16; "fp32");
                            anything else is a constexpr value (this is also how a stride of 1 is specialised, as
                            the JIT does at run time).
    configs(arch, spec):    the configs the runtime autotuner would consider for spec on that target; the first is
                            the one the specialisation sweep compiles.
    config_cases(arch):     every config of the target, each with the representative spec it is compiled at.
    specialisations():      the full list of specs the runtime can launch.
    mma_rows(cfg):          rows of the M operand of this kernel's main dots (wgmma wants >= 64 per 4 warps);
                            None when the kernel has no dots.
    uses_tensor_cores(spec): whether the dots should lower to MMA instructions (fp16/bf16; not fp32 at IEEE).
    """

    name: str
    kernel: Callable[[], Any]
    arguments: Callable[[Mapping, KernelConfig], dict]
    configs: Callable[[int, Mapping], list]
    config_cases: Callable[[int], list]
    specialisations: Callable[[], list]
    mma_rows: Callable[[KernelConfig], int] | None = None
    uses_tensor_cores: Callable[[Mapping], bool] = lambda spec: False


def entries() -> dict[str, KernelEntry]:
    """{kernel name: entry} of every registered kernel (_compile_registry.py), in registration order."""
    from ._compile_registry import entries as registered  # it imports this module's dataclasses

    out = {}
    for entry in registered():
        if entry.name in out:
            raise ValueError(f"two compile entries are named {entry.name!r}")
        out[entry.name] = entry
    return out


@dataclass(frozen=True)
class CompileCase:
    kernel: str
    arch: int
    config: KernelConfig
    spec: tuple  # ((name, value), ...)

    def spec_dict(self) -> dict:
        return dict(self.spec)


@dataclass
class CompileResult:
    kernel: str
    arch: int
    config: KernelConfig
    spec: dict
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    mma: str  # "wgmma", "mma" or "-"
    atomics: bool
    seconds: float
    asm: dict = field(default_factory=dict, repr=False)  # "ttir", "ptx" when requested

    @property
    def shared_ok(self) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_LIMIT[self.arch]


def _cases(kernels, targets, per_target) -> list[CompileCase]:
    """The cases of each selected kernel (all when `kernels` is empty) on each target, in registration order;
    per_target(entry, arch) gives the (config, spec) pairs."""
    out = []
    for name, entry in entries().items():
        if kernels and name not in kernels:
            continue
        for arch in targets:
            out += [CompileCase(name, arch, cfg, tuple(spec.items())) for cfg, spec in per_target(entry, arch)]
    return out


def config_cases(kernels: Sequence[str] | None = None, targets: Sequence[int] = TARGETS) -> list[CompileCase]:
    """Every config of every kernel, on each target, at the config's representative specialisation."""
    return _cases(kernels, targets, lambda entry, arch: entry.config_cases(arch))


def specialisation_cases(kernels: Sequence[str] | None = None, targets: Sequence[int] = TARGETS) -> list[CompileCase]:
    """Every specialisation of every kernel, on each target, at its first (default) config."""
    return _cases(kernels, targets,
                  lambda entry, arch: [(entry.configs(arch, spec)[0], spec) for spec in entry.specialisations()])


def full_cases(kernels: Sequence[str] | None = None, targets: Sequence[int] = TARGETS) -> list[CompileCase]:
    """The full product: every specialisation at every config the autotuner may pick for it."""
    return _cases(kernels, targets, lambda entry, arch: [(cfg, spec) for spec in entry.specialisations()
                                                         for cfg in entry.configs(arch, spec)])


# ------------------------------------------------------------------------------------------------------------------
# Compiling
# ------------------------------------------------------------------------------------------------------------------
def _ast_source(fn, arguments: Mapping):
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name not in arguments:
            raise KeyError(f"{fn.__name__}: no value for parameter {name!r} in the compile arguments")
        value = arguments[name]
        if isinstance(value, str):
            if value.startswith("*"):
                signature[name] = value
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif value.endswith(":16"):
                signature[name] = value[:-3]
                attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = value
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas_path(arch: int) -> str:
    try:  # the same ptxas triton itself uses for this target
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # pragma: no cover - older/newer triton layouts
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _gpu_name(arch: int) -> str:
    # wgmma (and setmaxnreg) exist only on the arch-specific sm_90a; triton targets it for capability 90.
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def _parse_ptxas_log(log: str) -> tuple[int | None, int | None]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None,
            int(spills.group(1)) + int(spills.group(2)) if spills else None)


def ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill bytes = spill stores + spill loads) of the kernel in `ptx`, from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name={_gpu_name(arch)}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on the generated PTX:\n{log}")
    return _parse_ptxas_log(log)


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "-"


def has_atomics(ttir: str, ptx: str) -> bool:
    return "tt.atomic_rmw" in ttir or re.search(r"\b(atom|red)\.", ptx) is not None


def compile_case(case: CompileCase, keep_asm: bool = False) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget

    entry = entries()[case.kernel]
    spec = case.spec_dict()
    options = {"num_warps": case.config.num_warps, "num_stages": case.config.num_stages}
    if case.config.maxnreg:
        options["maxnreg"] = case.config.maxnreg
    start = time.perf_counter()
    src = _ast_source(entry.kernel(), entry.arguments(spec, case.config))
    # triton already runs ptxas -v while building the cubin; with dump_ptxas_log it prints that log, which saves a
    # second ptxas run (a third of the time for fp32 kernels). A cache hit prints nothing: then run ptxas here.
    nvidia_knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if nvidia_knobs is not None and hasattr(nvidia_knobs, "dump_ptxas_log"):
            with nvidia_knobs.scope():
                nvidia_knobs.dump_ptxas_log = True
                compiled = triton.compile(src, target=GPUTarget("cuda", case.arch, 32), options=options)
        else:
            compiled = triton.compile(src, target=GPUTarget("cuda", case.arch, 32), options=options)
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    registers, spills = _parse_ptxas_log(log.getvalue())
    if registers is None or spills is None:
        registers, spills = ptxas_usage(ptx, case.arch)
    return CompileResult(
        kernel=case.kernel, arch=case.arch, config=case.config, spec=spec,
        shared_bytes=int(compiled.metadata.shared), registers=registers, spill_bytes=spills,
        mma=mma_kind(ptx), atomics=has_atomics(ttir, ptx), seconds=time.perf_counter() - start,
        asm={"ttir": ttir, "ptx": ptx} if keep_asm else {},
    )


@dataclass
class CompileError:
    """A case that failed to compile (kept as a value so one failure does not hide the other results)."""

    case: CompileCase
    message: str


def _compile_case_or_error(case: CompileCase, keep_asm: bool = False):
    try:
        return compile_case(case, keep_asm)
    except Exception as exc:  # noqa: BLE001 - reported per case, with the traceback text
        import traceback

        return CompileError(case, "".join(traceback.format_exception(exc))[-4000:])


def compile_cases(cases: Sequence[CompileCase], jobs: int | None = None, keep_asm: bool = False) -> list:
    """Compile each case (CompileResult, or CompileError for a failure), in the order of `cases`.

    Runs in `jobs` spawned processes (the MLIR passes hold the GIL). spawn, not fork: the parent may hold
    torch/OpenMP threads; as with any spawn pool, a calling script needs the `if __name__ == "__main__":` guard.
    """
    jobs = min(jobs or os.cpu_count() or 1, len(cases))
    if jobs <= 1:
        return [_compile_case_or_error(c, keep_asm) for c in cases]
    ctx = multiprocessing.get_context("spawn")
    worker = functools.partial(_compile_case_or_error, keep_asm=keep_asm)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        # One case per task: compile times differ 20x (fp32 FMA dots vs fp16 MMA), so chunks would leave a core idle.
        return list(pool.map(worker, cases, chunksize=1))


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def format_table(results: Sequence) -> str:
    header = ("kernel", "config", "target", "specialisation", "smem KiB", "regs", "spill B", "mma", "atomics", "s")
    rows = [header]
    for r in results:
        if isinstance(r, CompileError):
            c = r.case
            rows.append((c.kernel, c.config.label, f"sm_{c.arch}", spec_label(c.spec_dict()), "FAILED", "", "", "",
                         "", ""))
            continue
        rows.append((
            r.kernel, r.config.label, f"sm_{r.arch}", spec_label(r.spec),
            f"{r.shared_bytes / 1024:.1f}" + ("" if r.shared_ok else " (!)"),
            "?" if r.registers is None else str(r.registers),
            "?" if r.spill_bytes is None else str(r.spill_bytes),
            r.mma, "yes" if r.atomics else "no", f"{r.seconds:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def problems(result) -> list[str]:
    """What is wrong with a compiled kernel: a compile failure, shared memory over the device limit, spills."""
    if isinstance(result, CompileError):
        return [f"compile failed:\n{result.message}"]
    out = []
    if not result.shared_ok:
        out.append(f"shared memory {result.shared_bytes} B > {SHARED_MEMORY_LIMIT[result.arch]} B")
    if result.spill_bytes:
        out.append(f"{result.spill_bytes} bytes of register spills")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igpt_kernels._compile", description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", action="append", help="kernel name (repeatable); default: all registered")
    parser.add_argument("--target", type=int, action="append", choices=TARGETS, help="compute capability x10")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--specialisations", action="store_true", help="every specialisation at its first config")
    mode.add_argument("--full", action="store_true", help="every specialisation at every config")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--list", action="store_true", help="list the registered kernels and exit")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the JIT functions that get compiled")
    registry = entries()
    if args.list:
        print("\n".join(registry))
        return 0
    unknown = set(args.kernel or ()) - set(registry)
    if unknown:
        parser.error(f"unknown kernel(s) {sorted(unknown)}; registered: {sorted(registry)}")
    targets = tuple(args.target or TARGETS)
    select = full_cases if args.full else specialisation_cases if args.specialisations else config_cases
    cases = select(args.kernel, targets)
    start = time.perf_counter()
    results = compile_cases(cases, args.jobs)
    print(format_table(results))
    bad = [(r, p) for r in results for p in problems(r)]
    print(f"\n{len(results)} kernels compiled in {time.perf_counter() - start:.1f} s; {len(bad)} problem(s)")
    for r, p in bad:
        c = r.case if isinstance(r, CompileError) else r
        spec = c.spec_dict() if isinstance(r, CompileError) else c.spec
        print(f"  {c.kernel} {c.config.label} sm_{c.arch} [{spec_label(spec)}]: {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    # Run the package's copy of this module, the one the kernel modules import (not a second __main__ copy).
    from igpt_kernels._compile import main as _main

    sys.exit(_main())
