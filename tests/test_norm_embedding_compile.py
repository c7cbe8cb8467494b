"""Ahead-of-time compile checks of the norm and embedding kernels for sm_80 (A100) and sm_90 (H100), CPU only.

Each compiled kernel must fit the device's shared memory and spill no registers. The backward reductions (norm dg,
embedding d wte / d wpe) must contain no atomics on either target, and the embedding's distance code no fused
multiply-add (it would round (dr^2 + dg^2) once instead of twice and flip ties); a probe kernel shows both checks can
fail. Default suite: every config on both targets and every specialisation on sm_90; `--runslow` adds sm_80's.
"""
import importlib.util
import re

import pytest

from compile_cases import AVAILABLE, default_groups, group_tests
from igpt_kernels import _compile as C

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

KERNELS = ["norm.fwd", "norm.bwd", "embedding.fwd", "embedding.bwd_wte", "embedding.bwd_wpe"]
DETERMINISTIC = ["norm.bwd", "embedding.bwd_wte", "embedding.bwd_wpe"]
_FMA = re.compile(r"\bfma\.rn(\.ftz)?\.f32\b")
_ATOMIC = re.compile(r"\b(atom|red)\.")


GROUPS = default_groups(KERNELS)


def check_compiled(result):
    assert not isinstance(result, C.CompileError), result.message
    where = f"{result.kernel} {result.config.label} sm_{result.arch} [{C.spec_label(result.spec)}]"
    limit = C.SHARED_MEMORY_LIMIT[result.arch]
    assert result.shared_bytes <= limit, f"{where}: {result.shared_bytes} B shared memory > {limit} B"
    assert result.spill_bytes == 0, f"{where}: {result.spill_bytes} bytes of register spills"
    if result.kernel in DETERMINISTIC:
        assert "tt.atomic_rmw" not in result.asm["ttir"], f"{where}: atomic in the deterministic reduction's TTIR"
        assert not _ATOMIC.search(result.asm["ptx"]), f"{where}: atomic in the deterministic reduction's PTX"
    if result.kernel == "embedding.fwd" and result.spec["from_pixels"]:
        # The kernel's only floating multiplies are the distance squares: no fma anywhere means none there.
        assert not _FMA.search(result.asm["ptx"]), f"{where}: fma in the quantize distance code"
        assert re.search(r"\bmul\.rn(\.ftz)?\.f32\b", result.asm["ptx"]), f"{where}: no rounded square found"


(_COMPILED, test_every_config_compiles, test_every_specialisation_compiles,
 test_every_specialisation_compiles_sm80) = group_tests(GROUPS, check_compiled, keep_asm=True)


def test_registry_covers_every_kernel_and_target():
    names = {c.kernel for c in GROUPS["configs"]}
    assert names == set(KERNELS)
    for kernel in KERNELS:
        assert {c.arch for c in GROUPS["configs"] if c.kernel == kernel} == set(C.TARGETS)
    from igpt_kernels.norm import MAX_COLS
    from igpt_kernels._norm_triton import MAX_BLOCK_C, NUM_WARPS

    assert MAX_COLS == MAX_BLOCK_C and all(max(table) == MAX_BLOCK_C for table in NUM_WARPS.values())


# A probe with the same shape of arithmetic written the plain way, and one with an atomic: the checks above must see
# what they look for, or they could never fail.
if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(X, Y, OUT):
        offs = tl.arange(0, 128)
        x = tl.load(X + offs)
        y = tl.load(Y + offs)
        tl.store(OUT + offs, x * x + y * y)  # contracted to fma by default
        tl.atomic_add(OUT + offs, x)


@pytest.mark.parametrize("arch", C.TARGETS, ids=lambda a: f"sm{a}")
def test_probe_shows_the_checks_can_fail(arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_probe_kernel, signature={"X": "*fp32", "Y": "*fp32", "OUT": "*fp32"}, constexprs={})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    assert _FMA.search(compiled.asm["ptx"]), "plain a*a + b*b did not contract to fma: the no-fma check is vacuous"
    assert "tt.atomic_rmw" in compiled.asm["ttir"] and _ATOMIC.search(compiled.asm["ptx"])
