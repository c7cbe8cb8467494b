import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by tests/conftest.py
    pytest.skip("tests/interpret runs only under TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture
def launch_spy(monkeypatch):
    """Spies on triton: `autotuned` lists the kernels whose autotuner was entered, `launched` the (kernel, BLOCK_*
    meta-parameters) of every kernel launch, through an autotuner or not."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    seen = {"autotuned": [], "launched": []}
    autotuner_run, kernel_run = Autotuner.run, InterpretedFunction.run

    def spy_autotuner(self, *args, **kwargs):
        seen["autotuned"].append(self.fn.__name__)
        return autotuner_run(self, *args, **kwargs)

    def spy_kernel(self, *args, **kwargs):
        meta = tuple(sorted((k, v) for k, v in kwargs.items() if k.startswith("BLOCK_") and k != "BLOCK_D"))
        seen["launched"].append((self.__name__, meta))
        return kernel_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", spy_autotuner)
    monkeypatch.setattr(InterpretedFunction, "run", spy_kernel)
    return seen
