"""Ahead-of-time compile checks of the attention kernels for sm_80 (A100) and sm_90 (H100) on a CPU-only machine.

Each compiled kernel must fit the device's shared memory (163 KiB / 227 KiB), spill no registers, and lower its dots
to tensor-core MMAs for fp16/bf16 (wgmma on sm_90 when the M tile is >= 64 rows and the warps form warpgroups;
mma.sync on sm_80) while fp32 dots stay at IEEE precision (no MMA, i.e. no TF32). The deterministic backward must
contain no atomics, and the atomic variant must (so that check can fail).

Default suite: every config of both targets at a representative specialisation, and every specialisation (fp16,
bf16, fp32) at its first config on sm_90. `--runslow` adds the sm_80 specialisations and the full product.
Cases compile once per group, in parallel processes, the first time a test of the group runs.
"""
import importlib.util
import re

import pytest

from compile_cases import AVAILABLE, case_id, default_groups, group_tests
from igpt_kernels import _compile as C

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

KERNELS = ["attention.fwd", "attention.bwd_dkdv", "attention.bwd_dq", "attention.bwd_preprocess"]


GROUPS = {**default_groups(KERNELS), "full": C.full_cases(KERNELS) if AVAILABLE else []}


def check_compiled(result):
    assert not isinstance(result, C.CompileError), result.message
    entry = C.entries()[result.kernel]
    where = f"{result.kernel} {result.config.label} sm_{result.arch} [{C.spec_label(result.spec)}]"
    limit = C.SHARED_MEMORY_LIMIT[result.arch]
    assert result.shared_bytes <= limit, f"{where}: {result.shared_bytes} B shared memory > {limit} B"
    assert result.spill_bytes == 0, f"{where}: {result.spill_bytes} bytes of register spills"
    if entry.mma_rows is None:
        return
    if entry.uses_tensor_cores(result.spec):
        cfg = result.config
        if result.arch >= 90 and entry.mma_rows(cfg) >= 64 and cfg.num_warps % 4 == 0:
            assert result.mma == "wgmma", f"{where}: dots lowered to {result.mma!r}, expected wgmma"
        elif result.arch >= 90:
            assert result.mma in ("wgmma", "mma"), f"{where}: dots did not use tensor cores"
        else:
            assert result.mma == "mma", f"{where}: dots lowered to {result.mma!r}, expected mma.sync"
    else:
        # fp32 at input_precision="ieee": a tensor-core MMA here would mean TF32 rounding crept in.
        assert result.mma == "-", f"{where}: fp32 dots use {result.mma} (TF32?), expected IEEE FMA"


(_COMPILED, test_every_config_compiles, test_every_specialisation_compiles,
 test_every_specialisation_compiles_sm80) = group_tests(GROUPS, check_compiled)


@pytest.mark.slow
@pytest.mark.parametrize("case", GROUPS["full"], ids=case_id)
def test_full_product_compiles(case):
    check_compiled(_COMPILED.result("full", case))


def test_every_launchable_specialisation_is_covered():
    # The sweep must span what attention() accepts: every supported dtype and head-dim class, both flags.
    from igpt_kernels._compile_registry import COMPILE_DTYPES, COMPILE_HEAD_DIMS
    from igpt_kernels.attention import MAX_HEAD_DIM

    assert set(COMPILE_DTYPES) == {"fp16", "bf16", "fp32"}
    assert max(COMPILE_HEAD_DIMS) == MAX_HEAD_DIM and 96 in COMPILE_HEAD_DIMS
    swept = GROUPS["specialisations"] + GROUPS["specialisations_slow"]
    for arch in C.TARGETS:
        specs = {c.spec for c in swept if c.kernel == "attention.fwd" and c.arch == arch}
        assert len(specs) == len(COMPILE_DTYPES) * len(COMPILE_HEAD_DIMS) * 4


@pytest.mark.parametrize("arch", C.TARGETS, ids=lambda a: f"sm{a}")
def test_deterministic_backward_has_no_atomics(arch):
    entries = C.entries()
    spec = {"dtype": "fp16", "head_dim": 64, "causal": True, "key_mask": True}

    def case(kernel, **extra):
        s = {**spec, **extra} if kernel != "attention.bwd_preprocess" else {"dtype": "fp16", "head_dim": 64}
        return C.CompileCase(kernel, arch, entries[kernel].configs(arch, s)[0], tuple(s.items()))

    deterministic = [case("attention.bwd_preprocess"), case("attention.bwd_dkdv", atomic_dq=False),
                     case("attention.bwd_dq")]
    atomic = case("attention.bwd_dkdv", atomic_dq=True)
    results = C.compile_cases(deterministic + [atomic], keep_asm=True)
    for r in results:
        assert not isinstance(r, C.CompileError), r.message
    for r in results[:-1]:
        assert "tt.atomic_rmw" not in r.asm["ttir"], f"{r.kernel}: atomic in the deterministic backward's TTIR"
        assert not re.search(r"\b(atom|red)\.", r.asm["ptx"]), f"{r.kernel}: atomic in the deterministic PTX"
    r = results[-1]
    assert "tt.atomic_rmw" in r.asm["ttir"] and re.search(r"\b(atom|red)\.", r.asm["ptx"]), \
        "the atomic dQ variant shows no atomics: the check above could not fail"
