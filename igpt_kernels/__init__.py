"""igpt_kernels: fused Triton kernels with plain-torch references (the folder igpt_kernels/ of the iGPT repo).

Each op lives in its own module (validation, custom ops, functional entry point), its Triton kernels in
_<op>_triton.py and its reference in reference.py; the contracts are in docs/DESIGN.md. `backend(op, device)` says
which implementation an op runs where. Importing this package does not import triton: the kernel modules load it on
first use.
"""
from ._dispatch import BACKENDS, backend
from .attention import attention
from .embedding import palette_embedding
from .norm import norm
from .reference import attention_reference, norm_reference, palette_embedding_reference, quantize_reference

__all__ = ["BACKENDS", "attention", "attention_reference", "backend", "norm", "norm_reference", "palette_embedding",
           "palette_embedding_reference", "quantize_reference"]
