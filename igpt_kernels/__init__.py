"""igpt_kernels: fused Triton kernels with plain-torch references (the folder igpt_kernels/ of the iGPT repo).

Each op lives in its own module (Triton kernels + autograd.Function + functional entry point) and has its
reference in reference.py. Importing this package does not import triton: the kernel modules load it on first use.
"""
from .attention import attention
from .embedding import palette_embedding
from .norm import norm
from .reference import attention_reference, norm_reference, palette_embedding_reference, quantize_reference

__all__ = ["attention", "attention_reference", "norm", "norm_reference", "palette_embedding",
           "palette_embedding_reference", "quantize_reference"]
