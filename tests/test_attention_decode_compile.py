"""Ahead-of-time compile checks of the split-KV decode kernels for sm_80 and sm_90 on a CPU-only machine.

Each kernel must fit shared memory and spill no registers; fp16/bf16 dots use mma.sync on both targets (the 16-row
query tile is below wgmma's 64 rows, so wgmma on sm_90 would be a surprise worth a look), fp32 dots stay at IEEE
precision (no MMA), and nothing uses atomics (the splits are merged in a fixed order). Default suite: every config
(one per target, dtype group and head dim) and every specialisation on sm_90; `--runslow` adds sm_80's.
"""
import importlib.util

import pytest

from compile_cases import default_groups, group_tests
from igpt_kernels import _compile as C

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

KERNELS = ["attention.decode_split", "attention.decode_combine"]


GROUPS = default_groups(KERNELS)


def check_compiled(result):
    assert not isinstance(result, C.CompileError), result.message
    where = f"{result.kernel} {result.config.label} sm_{result.arch} [{C.spec_label(result.spec)}]"
    assert C.problems(result) == [], f"{where}: {C.problems(result)}"
    assert not result.atomics, f"{where}: atomics in a kernel meant to be deterministic"
    entry = C.entries()[result.kernel]
    if entry.mma_rows is None:
        assert result.mma == "-", f"{where}: unexpected MMA in a kernel without dots"
    elif entry.uses_tensor_cores(result.spec):
        assert result.mma == "mma", f"{where}: 16-row dots lowered to {result.mma!r}, expected mma.sync"
    else:
        assert result.mma == "-", f"{where}: fp32 dots use {result.mma} (TF32?), expected IEEE FMA"


(_COMPILED, test_every_config_compiles, test_every_specialisation_compiles,
 test_every_specialisation_compiles_sm80) = group_tests(GROUPS, check_compiled)


def test_the_table_covers_every_launchable_config():
    # every (target, dtype, padded head dim) the launcher can ask for has a config, and the sweep compiles it
    from igpt_kernels import _decode_triton as T
    from igpt_kernels.attention import MAX_HEAD_DIM

    swept = {(c.arch, c.config) for c in GROUPS["configs"]}
    for arch in C.TARGETS:
        for element_size in (2, 4):
            for d in range(1, MAX_HEAD_DIM + 1):
                block_n, warps, stages = T.decode_config(arch, element_size, d)
                assert block_n >= 16 and block_n & (block_n - 1) == 0
                cfg = C.KernelConfig((("BLOCK_M", 16), ("BLOCK_N", block_n)), warps, stages)
                assert (arch, cfg) in swept, (arch, element_size, d)
