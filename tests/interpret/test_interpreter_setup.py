"""The interpreter half of the suite really interprets: Triton kernels run on CPU tensors in this process."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * alpha + y, mask=mask)


def test_triton_kernels_run_on_cpu_tensors():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    x, y = torch.randn(1000), torch.randn(1000)
    out = torch.full_like(x, float("nan"))
    _scaled_add[(triton.cdiv(1000, 256),)](x, y, out, 1000, 0.5, BLOCK=256)
    torch.testing.assert_close(out, 0.5 * x + y)
