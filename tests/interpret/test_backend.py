"""igpt_kernels.backend under TRITON_INTERPRET=1: CPU tensors go to the Triton kernels through the interpreter, and
the op really launches them."""
import torch

import igpt_kernels
from igpt_kernels.norm import launch_counts as norm_launches


def test_cpu_tensors_run_the_interpreter():
    assert [igpt_kernels.backend(op, "cpu") for op in ("attention", "norm", "palette_embedding")] == ["interpret"] * 3
    x, w = torch.randn(3, 8), torch.ones(8)
    before = norm_launches["norm_fwd"]
    igpt_kernels.norm(x, w)
    assert igpt_kernels.backend("norm", x) == "interpret" and norm_launches["norm_fwd"] == before + 1
