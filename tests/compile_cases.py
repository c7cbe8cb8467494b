"""Shared by the ahead-of-time compile tests: which cases each test group compiles, compiled once per group (in
parallel processes) the first time one of its tests runs, and readable test ids."""
import importlib.util
import os

import pytest

from igpt_kernels import _compile as C

# the compile needs real JIT functions: nothing to do under the interpreter or without triton
AVAILABLE = os.environ.get("TRITON_INTERPRET") != "1" and importlib.util.find_spec("triton") is not None


def default_groups(kernels):
    """Every config of both targets; every specialisation on sm_90 (the reference GPU) by default, sm_80's slow."""
    if not AVAILABLE:
        return {"configs": [], "specialisations": [], "specialisations_slow": []}
    every_spec = C.specialisation_cases(kernels)
    return {
        "configs": C.config_cases(kernels),
        "specialisations": [c for c in every_spec if c.arch == 90],
        "specialisations_slow": [c for c in every_spec if c.arch != 90],
    }


class CompiledGroups:
    def __init__(self, groups, keep_asm=False):
        self.groups, self.keep_asm, self._results = groups, keep_asm, {}

    def result(self, group, case):
        if group not in self._results:
            cases = list(dict.fromkeys(self.groups[group]))
            self._results[group] = dict(zip(cases, C.compile_cases(cases, keep_asm=self.keep_asm)))
        return self._results[group][case]


def case_id(case):
    spec = "-".join(f"{v}" if not isinstance(v, bool) else (k if v else f"no_{k}") for k, v in case.spec)
    return f"{case.kernel}-sm{case.arch}-{case.config.label.replace(' ', '_')}-{spec}"


def group_tests(groups, check, keep_asm=False):
    """The tests each compile module shares, checking every case with `check(result)`: (compiled groups, every
    config, every sm_90 specialisation, the sm_80 specialisations (slow)). Assign them to test_* names."""
    compiled = CompiledGroups(groups, keep_asm)

    def run(group):
        @pytest.mark.parametrize("case", groups[group], ids=case_id)
        def test(case):
            check(compiled.result(group, case))
        return test

    return compiled, run("configs"), run("specialisations"), pytest.mark.slow(run("specialisations_slow"))
