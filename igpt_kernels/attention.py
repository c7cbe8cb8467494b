"""Fused attention (FlashAttention-2 style): forward and backward, causal or bidirectional, key mask, Nq <= Nk.

    attention(q, k, v, *, causal, key_mask=None, sm_scale=None, deterministic=False) -> out [B, H, Nq, D]

Contract (docs/DESIGN.md): q [B,H,Nq,D], k/v [B,H,Nk,D], Nq <= Nk; causal is aligned bottom-right (query i sees keys
j <= i + Nk - Nq, as FlashAttention >= 2.1, so KV-cache decode needs no special case); key_mask [B,Nk] bool,
True = attend, combinable with causal; a query row with no key to attend gives 0 and zero gradients (no NaN);
fp16, bf16 and fp32 (fp32 dots at IEEE precision, no TF32). sm_scale defaults to 1/sqrt(D).
deterministic=True computes dQ in a separate pass over query tiles instead of with atomic adds, and launches every
kernel (forward included) at one fixed tile config, the first of its table group, instead of the autotuner's timed
pick: outputs and gradients are bit-reproducible run to run, across restarts and ranks (at some cost in speed).

Dispatch: CUDA tensors run the Triton kernels (in _attention_triton.py, imported on first use); CPU tensors run the
torch reference (reference.py), except when the process runs under TRITON_INTERPRET=1, where the Triton kernels run
on CPU tensors through the interpreter. `launch_counts` counts kernel launches by name ("attn_fwd",
"attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"), so tests can check that the Triton path really ran.
The Triton path is the custom ops torch.ops.igpt.attention_fwd / attention_bwd (_custom_ops.py): torch.compile records
them as opaque calls, so a model on them compiles with fullgraph=True.

Decode (split_kv): with Nq <= 16 and no gradient needed (grad mode off, or no input requires grad) the Triton path
is a split-KV forward (flash-decoding, _decode_triton.py; custom op torch.ops.igpt.attention_decode, launches
"attn_decode_split" and "attn_decode_combine"): every program takes one (b, h, key split), so a few heads still fill
the GPU, and it has no autotuning and no host sync. split_kv=False keeps the main kernel (for comparisons);
split_kv=True requires the decode path's conditions; None (default) chooses automatically. The output of the decode
path is a [B, H, Nq, D] view of contiguous [B, Nq, H, D] memory, so `.transpose(1, 2).reshape(B, Nq, H * D)` is free.

Memory: the Triton path allocates O(B*H*N*D) only (outputs, fp32 log-sum-exp and delta per row, an fp32 dQ buffer for
the atomic variant); scores and probabilities live in registers, tile by tile.
"""
from __future__ import annotations

import collections
import math

import torch

from ._custom_ops import custom_op
from ._dispatch import TritonDispatch, cdiv
from .reference import attention_reference

__all__ = ["attention", "launch_counts", "MAX_HEAD_DIM", "MAX_DECODE_QUERIES", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims up to 128; those that are not a power of two (e.g. 96) are padded inside the kernel with masked loads.
# 192/256 are refused: their dK/dV accumulators ([BLOCK_N, 256] fp32, twice) spill registers at every tile shape
# that keeps the MMA efficient (see `python -m igpt_kernels._compile`).
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

MAX_DECODE_QUERIES = 16  # the split-KV decode path holds all queries of a head in one 16-row tile

launch_counts: collections.Counter = collections.Counter()

_dispatch = TritonDispatch("attention", "igpt_kernels._attention_triton")
_kernels = _dispatch.kernels
_use_triton = _dispatch.use_triton


# ------------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, causal, key_mask, sm_scale, deterministic) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; supported are float16, bfloat16 and float32. "
                            f"Cast with .to(torch.float16/bfloat16/float32) (igpt_kernels.attention_reference "
                            f"accepts float64).")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        f"cast them to the same dtype.")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be True or False, got {causal!r} ({type(causal).__name__})")
    if not isinstance(deterministic, bool):
        raise TypeError(f"attention: deterministic must be True or False, got {deterministic!r}")

    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}; "
                             f"reshape [B, N, H*D] activations with .view(B, N, H, D).transpose(1, 2).")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape [B, H, Nk, D], got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    (b, h, n_q, d), n_k = q.shape, k.shape[2]
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on B, H and D "
                         f"(q [B,H,Nq,D], k/v [B,H,Nk,D]); repeat k/v heads for grouped-query attention.")
    if n_k < 1:
        raise ValueError("attention: k/v have no keys (Nk = 0); at least one key is needed.")
    if n_q > n_k:
        raise ValueError(f"attention: Nq = {n_q} > Nk = {n_k}. Queries are the last Nq positions of the key "
                         f"sequence (KV-cache decode), so Nq <= Nk; pass the full key/value sequence.")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D = {d} is not supported; the fused kernels take 1 <= D <= "
                         f"{MAX_HEAD_DIM} (192/256 would spill registers). Use more heads of a smaller D, or "
                         f"igpt_kernels.attention_reference.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; "
                         f"move them with .to(device).")

    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise TypeError(f"attention: key_mask must be a bool torch.Tensor or None, got {type(key_mask).__name__}")
        if key_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_mask must have dtype torch.bool (True = attend), got {key_mask.dtype}; "
                            f"convert with key_mask.bool() (or `ids != pad_id`).")
        if tuple(key_mask.shape) != (b, n_k):
            raise ValueError(f"attention: key_mask must have shape [B, Nk] = [{b}, {n_k}], got "
                             f"{tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"attention: key_mask is on {key_mask.device} but q is on {q.device}; "
                             f"move it with key_mask.to(q.device).")

    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"attention: sm_scale must be a Python float or None, got {type(sm_scale).__name__}; "
                        f"use float(x).")
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"attention: sm_scale must be a finite positive number, got {sm_scale}; "
                         f"None gives the usual 1/sqrt(D) = {1.0 / math.sqrt(d):.6g}.")
    return float(sm_scale)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _tune_bucket(n: int) -> int:
    # Autotune per power-of-two length bucket: decode grows Nk by one per step and must not re-tune every step.
    return 1 << max(0, n - 1).bit_length()


def _new_output(q):
    """[B, H, Nq, D], laid out as [B, Nq, H, D]: the model's output projection reads [B, Nq, H * D] as a view."""
    b, h, n_q, d = q.shape
    return q.new_empty((b, n_q, h, d)).transpose(1, 2)


def _key_mask_args(key_mask, like):
    if key_mask is None:  # never read (HAS_MASK=False); a real 1-byte buffer keeps the pointer type fixed
        return torch.empty(1, dtype=torch.uint8, device=like.device), 0, 0
    mask = key_mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def _forward(q, k, v, key_mask, causal, sm_scale, deterministic=False):
    tk = _kernels()
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    o = _new_output(q)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    mask, stride_mb, stride_mn = _key_mask_args(key_mask, q)

    def grid(meta):
        return (cdiv(n_q, meta["BLOCK_M"]), h, b)

    kernel, fixed = tk.launcher("fwd", deterministic, q.device, d, q.element_size())
    kernel[grid](
        q, k, v, mask, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), stride_mb, stride_mn,
        h, n_q, n_k, sm_scale * _LOG2E, _tune_bucket(n_q), _tune_bucket(n_k),
        HEAD_DIM=d, BLOCK_D=tk.block_d(d), CAUSAL=causal, HAS_MASK=key_mask is not None, **fixed,
    )
    launch_counts["attn_fwd"] += 1
    return o, lse


def _backward(do, q, k, v, o, lse, key_mask, causal, sm_scale, deterministic):
    tk = _kernels()
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    bd = tk.block_d(d)
    mask, stride_mb, stride_mn = _key_mask_args(key_mask, q)

    delta = torch.empty_like(lse)
    tk.attn_bwd_preprocess_kernel[(cdiv(n_q, tk.PREPROCESS_BLOCK_M), h, b)](
        o, do, delta, *o.stride(), *do.stride(), h, n_q, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=tk.PREPROCESS_BLOCK_M,
    )
    launch_counts["attn_bwd_preprocess"] += 1

    dk = torch.empty((b, h, n_k, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, h, n_k, d), dtype=v.dtype, device=v.device)
    if deterministic:
        dq_acc = torch.empty(1, dtype=torch.float32, device=q.device)  # not touched (ATOMIC_DQ=False)
    else:
        dq_acc = torch.zeros((b, h, n_q, d), dtype=torch.float32, device=q.device)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), stride_mb, stride_mn,
              h, n_q, n_k, sm_scale, sm_scale * _LOG2E, _tune_bucket(n_q), _tune_bucket(n_k))
    flags = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=causal, HAS_MASK=key_mask is not None)

    def grid_keys(meta):
        return (cdiv(n_k, meta["BLOCK_N"]), h, b)

    kernel, fixed = tk.launcher("dkdv", deterministic, q.device, d, q.element_size())
    kernel[grid_keys](q, k, v, mask, do, lse, delta, dk, dv, dq_acc, *common,
                      ATOMIC_DQ=not deterministic, **flags, **fixed)
    launch_counts["attn_bwd_dkdv"] += 1

    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv

    dq = torch.empty((b, h, n_q, d), dtype=q.dtype, device=q.device)

    def grid_queries(meta):
        return (cdiv(n_q, meta["BLOCK_M"]), h, b)

    kernel, fixed = tk.launcher("dq", deterministic, q.device, d, q.element_size())
    kernel[grid_queries](q, k, v, mask, do, lse, delta, dq, *common, **flags, **fixed)
    launch_counts["attn_bwd_dq"] += 1
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton path is opaque to torch.compile (dynamo traces neither the autotuner nor the launches; the
# fake implementations give it the output shapes). The entry point validates before calling them.
# ------------------------------------------------------------------------------------------------------------------
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool,
                   sm_scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (out [B,H,Nq,D] in q's dtype, log-sum-exp [B,H,Nq] fp32). Inputs must be valid;
    `deterministic` fixes the tile config (and selects the backward)."""
    return _forward(q, k, v, key_mask, causal, sm_scale, deterministic)


def _attention_fwd_fake(q, k, v, key_mask, causal, sm_scale, deterministic):
    b, h, n_q, d = q.shape
    return _new_output(q), q.new_empty((b, h, n_q), dtype=torch.float32)


def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, key_mask: torch.Tensor | None, causal: bool, sm_scale: float,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dq, dk, dv), contiguous, in q's dtype."""
    # The kernels index lse as contiguous (attention_fwd's output); o and do are read through their strides.
    return _backward(do, q, k, v, o, lse.contiguous(), key_mask, causal, sm_scale, deterministic)


def _attention_bwd_fake(do, q, k, v, o, lse, key_mask, causal, sm_scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, causal, sm_scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_mask)
    ctx.causal, ctx.sm_scale, ctx.deterministic = causal, sm_scale, deterministic
    ctx.set_materialize_grads(False)  # lse is never used downstream: no zero gradient to allocate for it


def _backward_formula(ctx, do, _dlse):
    q, k, v, o, lse, key_mask = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None, None, None
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, key_mask, ctx.causal, ctx.sm_scale, ctx.deterministic)
    return dq, dk, dv, None, None, None, None


attention_bwd = custom_op("attention_bwd", _attention_bwd, fake=_attention_bwd_fake)
attention_fwd = custom_op("attention_fwd", _attention_fwd, fake=_attention_fwd_fake, backward=_backward_formula,
                          setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------------------
# Decode: split-KV forward (Nq <= MAX_DECODE_QUERIES, no gradient), a custom op of its own without autograd
# ------------------------------------------------------------------------------------------------------------------
_decode_dispatch = TritonDispatch("attention", "igpt_kernels._decode_triton")


def _decode_forward(q, k, v, key_mask, causal, sm_scale):
    tk = _decode_dispatch.kernels()
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    (block_n, num_warps, num_stages), n_splits, keys_per_split = tk.launch_plan(q, n_k)
    acc = torch.empty((b, h, n_splits, n_q, d), dtype=torch.float32, device=q.device)
    m = torch.empty((b, h, n_splits, n_q), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    mask, stride_mb, stride_mn = _key_mask_args(key_mask, q)
    tk.attn_decode_split_kernel[(n_splits, h, b)](
        q, k, v, mask, acc, m, l,
        *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn,
        h, n_q, n_k, keys_per_split, sm_scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=tk.block_d(d), CAUSAL=causal, HAS_MASK=key_mask is not None,
        BLOCK_M=tk.BLOCK_M, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )
    launch_counts["attn_decode_split"] += 1
    o = _new_output(q)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    tk.attn_decode_combine_kernel[(h, b)](
        acc, m, l, o, lse, *o.stride(), h, n_q, n_splits,
        HEAD_DIM=d, BLOCK_D=tk.block_d(d), BLOCK_M=tk.BLOCK_M, num_warps=tk.COMBINE_WARPS, num_stages=1,
    )
    launch_counts["attn_decode_combine"] += 1
    return o, lse


def _attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool,
                      sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV Triton forward for Nq <= 16: (out [B,H,Nq,D] over [B,Nq,H,D] memory, log-sum-exp [B,H,Nq] fp32,
    base 2). Inputs must be valid; not differentiable."""
    return _decode_forward(q, k, v, key_mask, causal, sm_scale)


def _attention_decode_fake(q, k, v, key_mask, causal, sm_scale):
    return _attention_fwd_fake(q, k, v, key_mask, causal, sm_scale, False)


attention_decode = custom_op("attention_decode", _attention_decode, fake=_attention_decode_fake)


def _use_split_kv(q, k, v, split_kv) -> bool:
    """Whether the call takes the split-KV decode path (on the Triton path); checks the split_kv argument."""
    if split_kv is not None and not isinstance(split_kv, bool):
        raise TypeError(f"attention: split_kv must be True, False or None (automatic), got {split_kv!r}")
    fits = q.shape[2] <= MAX_DECODE_QUERIES
    no_grad = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    if split_kv is None:
        return fits and no_grad
    if split_kv and not fits:
        raise ValueError(f"attention: split_kv=True takes at most {MAX_DECODE_QUERIES} queries per head, got Nq = "
                         f"{q.shape[2]}; pass split_kv=None (automatic) or False.")
    if split_kv and not no_grad:
        raise ValueError("attention: split_kv=True has no backward, but an input requires grad; run under "
                         "torch.no_grad() or pass split_kv=None (automatic) or False.")
    return split_kv


def attention(q, k, v, *, causal, key_mask=None, sm_scale=None, deterministic=False, split_kv=None):
    """Scaled dot-product attention; see the module docstring for the full contract.

    q [B,H,Nq,D], k/v [B,H,Nk,D] (Nq <= Nk), key_mask [B,Nk] bool (True = attend) or None -> [B,H,Nq,D].
    split_kv: None chooses the split-KV decode kernels when Nq <= 16 and no gradient is needed; False never uses
    them (e.g. to compare against the main kernel); True requires them. The CPU reference path ignores it.
    Raises TypeError for a wrong dtype/type and ValueError for a wrong shape, device or value.
    """
    sm_scale = _check_inputs(q, k, v, causal, key_mask, sm_scale, deterministic)
    decode = _use_split_kv(q, k, v, split_kv)
    if q.numel() == 0 or not _use_triton(q.device):
        return attention_reference(q, k, v, causal=causal, key_mask=key_mask, sm_scale=sm_scale)
    if decode:
        return attention_decode(q, k, v, key_mask, causal, sm_scale)[0]
    return attention_fwd(q, k, v, key_mask, causal, sm_scale, deterministic)[0]
