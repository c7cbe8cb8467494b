"""Fused iGPT norm (RMS-style: no mean subtraction, no bias), forward and backward, optional fused residual add.

    norm(x, weight, eps=1e-5, residual=None) -> y                        y = x * rsqrt(mean(x^2) + eps) * weight
    norm(x, weight, eps, residual=r)         -> (y, h)   with h = x + r, y = norm(h)

Contract (docs/DESIGN.md): x [..., C], weight [C], residual shaped like x; fp16, bf16 and fp32 storage, fp32 math.
y and h have x's dtype; gradients flow to x, weight and residual (d residual = dx). Fusing the residual add saves a
full read and write of the activation per block: the pre-norm block computes `h = h + f(...)` and `norm(h)` in one
pass.

Dispatch: CUDA tensors run the Triton kernels (in _norm_triton.py, imported on first use); CPU tensors run the torch
reference (reference.py), except under TRITON_INTERPRET=1, where the Triton kernels run through the interpreter.
`launch_counts` counts launches ("norm_fwd", "norm_bwd") so tests can check that the Triton path really ran.
The Triton path is the custom ops torch.ops.igpt.norm_fwd / norm_bwd (_custom_ops.py), opaque to torch.compile.

Determinism: dweight is reduced through a [programs, C] fp32 buffer of per-program partial sums and one torch sum,
never float atomics, so every gradient is bit-reproducible run to run.
"""
from __future__ import annotations

import collections
import math

import torch

from ._custom_ops import custom_op
from ._dispatch import TritonDispatch, device_arch
from .reference import norm_reference

__all__ = ["norm", "launch_counts", "MAX_COLS", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One row is one register vector; 8192 (twice iGPT-XL's 3072 rounded up) is the widest compiled without spills.
MAX_COLS = 8192

launch_counts: collections.Counter = collections.Counter()

_dispatch = TritonDispatch("norm", "igpt_kernels._norm_triton")
_kernels = _dispatch.kernels
_use_triton = _dispatch.use_triton


# ------------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------------
def _check_inputs(x, weight, eps, residual) -> float:
    for name, t in (("x", x), ("weight", weight)) + ((("residual", residual),) if residual is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"norm: {name} has dtype {t.dtype}; supported are float16, bfloat16 and float32. "
                            f"Cast with .to(torch.float32) (igpt_kernels.norm_reference accepts float64).")
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"norm: residual has dtype {residual.dtype} but x has {x.dtype}; they are added, so cast "
                        f"the residual to x's dtype.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"norm: eps must be a Python float, got {type(eps).__name__}; use float(eps).")

    if x.dim() < 1:
        raise ValueError("norm: x must have at least one dimension [..., C], got a 0-d tensor.")
    n_cols = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"norm: weight must have shape [C] = [{n_cols}] (x's last dimension), got "
                         f"{tuple(weight.shape)}.")
    if not 1 <= n_cols <= MAX_COLS:
        raise ValueError(f"norm: rows of C = {n_cols} are not supported; the fused kernel takes 1 <= C <= "
                         f"{MAX_COLS}. Use igpt_kernels.norm_reference for wider rows.")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}; "
                         f"broadcasting is not supported, expand it explicitly.")
    devices = {t.device for t in (x, weight, residual) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"norm: x, weight and residual must be on one device, got {sorted(map(str, devices))}; "
                         f"move them with .to(device).")
    # comparisons, not math.isfinite: torch.compile(dynamic=True) makes float attributes symbolic (NaN fails both)
    if not (0 <= eps < math.inf):
        raise ValueError(f"norm: eps must be finite and >= 0, got {eps}; the default is 1e-5.")
    return float(eps)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _rows(t):
    # [..., C] -> [rows, C] with unit column stride (a view when possible); the kernels index rows by one stride.
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(bc, device):
    arch = device_arch(device)
    return 4 if arch is None else _kernels().NUM_WARPS[arch][bc]  # the interpreter ignores num_warps


def _backward_programs(n_rows, device):
    tk = _kernels()
    if device.type != "cuda":
        return max(1, min(n_rows, tk.INTERPRET_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, sms * tk.PROGRAMS_PER_SM))


def _forward(x, weight, eps, residual):
    tk = _kernels()
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    bc = tk.block_c(n_cols)
    w = weight.contiguous()
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        h = torch.empty_like(y)
    else:
        r2, h = x2, y  # never read/written (HAS_RESIDUAL=False); real tensors keep the pointer types fixed
    tk.norm_fwd_kernel[(n_rows,)](
        x2, r2, w, y, h, rstd,
        x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_C=bc, num_warps=_num_warps(bc, x.device),
    )
    launch_counts["norm_fwd"] += 1
    # Without a residual the backward re-reads x itself as h.
    return y.view(x.shape), (h if residual is not None else x2), rstd


def _backward(dy, dh_out, h2, weight, rstd, has_residual):
    tk = _kernels()
    n_rows, n_cols = h2.shape
    bc = tk.block_c(n_cols)
    dy2 = _rows(dy)
    dho2 = _rows(dh_out) if dh_out is not None else dy2
    dx = torch.empty((n_rows, n_cols), dtype=h2.dtype, device=h2.device)
    dr = torch.empty_like(dx) if has_residual else dx
    programs = _backward_programs(n_rows, h2.device)
    dg_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=h2.device)
    tk.norm_bwd_kernel[(programs,)](
        dy2, dho2, h2, weight, rstd, dx, dr, dg_partial,
        dy2.stride(0), dho2.stride(0), h2.stride(0), dx.stride(0), dr.stride(0),
        n_rows, n_cols,
        HAS_DH_OUT=dh_out is not None, HAS_RESIDUAL=has_residual, BLOCK_C=bc,
        num_warps=_num_warps(bc, h2.device),
    )
    launch_counts["norm_bwd"] += 1
    dg = dg_partial.sum(dim=0).to(weight.dtype)
    return dx, (dr if has_residual else None), dg


# ------------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton path is opaque to torch.compile (the fake implementations give it the output shapes). The
# entry point validates before calling them. Custom ops return no None, so an absent output is an empty tensor.
# ------------------------------------------------------------------------------------------------------------------
def _norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: (y, h = x + residual (empty without a residual), rstd [rows] fp32). Inputs must be valid."""
    y, h2, rstd = _forward(x, weight, eps, residual)
    h = h2.view(x.shape) if residual is not None else x.new_empty(0)
    return y, h, rstd


def _norm_fwd_fake(x, weight, residual, eps):
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, x.new_empty(math.prod(x.shape[:-1]), dtype=torch.float32)


def _norm_bwd(dy: torch.Tensor, dh_out: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              has_residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dx, d residual (empty without a residual), dweight). h is the normalised input (x + residual,
    or x), dh_out the gradient reaching h from downstream (None where h was not used)."""
    dx, dr, dg = _backward(dy, dh_out, _rows(h), weight, rstd, has_residual)
    return dx.view(h.shape), (dr.view(h.shape) if dr is not None else h.new_empty(0)), dg


def _norm_bwd_fake(dy, dh_out, h, weight, rstd, has_residual):
    return h.new_empty(h.shape), h.new_empty(h.shape if has_residual else 0), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, residual, _eps = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    # Without a residual the backward re-reads x itself as h.
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
    # Gradients the caller does not use arrive as None (no zero tensors to read); see the backward.
    ctx.set_materialize_grads(False)


def _backward_formula(ctx, dy, dh_out, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if not ctx.has_residual:
        dh_out = None  # the gradient of the empty placeholder output (torch.compile passes one)
    if dy is None and dh_out is None:
        return None, None, None, None
    if dy is None:  # only h was used downstream
        dy = torch.zeros_like(h)
    dx, dr, dg = norm_bwd(dy, dh_out, h, weight, rstd, ctx.has_residual)
    return dx, dg, (dr if ctx.has_residual else None), None


norm_bwd = custom_op("norm_bwd", _norm_bwd, fake=_norm_bwd_fake)
norm_fwd = custom_op("norm_fwd", _norm_fwd, fake=_norm_fwd_fake, backward=_backward_formula,
                     setup_context=_setup_context)


def norm(x, weight, eps=1e-5, residual=None):
    """iGPT norm; see the module docstring for the full contract.

    Returns y, or (y, x + residual) when a residual is given. Raises TypeError for a wrong dtype/type and
    ValueError for a wrong shape, device or value.
    """
    eps = _check_inputs(x, weight, eps, residual)
    if x.numel() == 0 or not _use_triton(x.device):
        return norm_reference(x, weight, eps, residual)
    y, h, _ = norm_fwd(x, weight.contiguous(), residual, eps)
    return y if residual is None else (y, h)
