"""Shared pytest set-up.

Two processes make up the suite (see CONTRIBUTING.md):
  * `pytest`                                  -> everything except tests/interpret (triton compiles for real here)
  * `TRITON_INTERPRET=1 pytest tests/interpret` -> Triton kernels executed by the interpreter on CPU tensors
TRITON_INTERPRET is read when triton decorates a kernel, so the two kinds cannot share one process.
"""
import os

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Keep each process to its own half of the suite.
collect_ignore = [] if INTERPRET else ["interpret"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if INTERPRET and "interpret" not in item.nodeid.split("/"):
            item.add_marker(pytest.mark.skip(reason="only tests/interpret runs under TRITON_INTERPRET=1"))


@pytest.fixture
def cpu_without_onednn_bf16(monkeypatch):
    """This process acts like an AVX2-only CPU (AMD Zen 3): torch's oneDNN bf16 check says no and oneDNN's bf16 ops
    raise as they do there, so the fallback paths are tested on AVX-512 machines too."""
    import torch

    mkldnn = torch.ops.mkldnn
    reorder, linear = mkldnn._reorder_linear_weight, mkldnn._linear_pointwise

    def refuse_bf16(op):
        def call(x, *args, **kwargs):
            if x.dtype == torch.bfloat16:
                raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                                   "avx512bw, avx512vl and avx512dq (simulated AVX2-only CPU)")
            return op(x, *args, **kwargs)
        return call

    monkeypatch.setattr(mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(mkldnn, "_reorder_linear_weight", refuse_bf16(reorder))
    monkeypatch.setattr(mkldnn, "_linear_pointwise", refuse_bf16(linear))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
