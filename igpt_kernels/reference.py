"""Plain-torch references of the fused ops: the CPU path and the test oracle.

Each op gets one section. References are written for clarity and exactness, not speed: they run in any floating
dtype (float64 included, for the test oracle), are differentiable by autograd, and follow the same contracts as the
fused entry points (see docs/DESIGN.md). Input validation lives in the fused entry points, not here.
"""
import math

import torch

__all__ = ["attention_reference", "attention_allowed_mask", "norm_reference", "palette_embedding_reference",
           "pixel_to_unit_table", "quantize_reference"]


# ------------------------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------------------------
def attention_allowed_mask(n_q, n_k, *, causal, key_mask=None, device=None):
    """Boolean [B or 1, 1, Nq, Nk] mask, True where query i may attend key j; None when everything is allowed.

    Causal is aligned bottom-right (FlashAttention >= 2.1): query i sees keys j <= i + (Nk - Nq), so with a KV cache
    the last query sees every key. One mask = causal AND key mask (SDPA refuses attn_mask together with is_causal).
    """
    allowed = None
    if causal:
        i = torch.arange(n_q, device=device)[:, None]
        j = torch.arange(n_k, device=device)[None, :]
        allowed = (j <= i + (n_k - n_q))[None, None]
    if key_mask is not None:
        keys = key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def attention_reference(q, k, v, *, causal, key_mask=None, sm_scale=None):
    """softmax(q k^T * sm_scale + mask) v in q's dtype; rows with no key to attend give 0 and zero gradients.

    q [B,H,Nq,D], k/v [B,H,Nk,D], key_mask [B,Nk] bool (True = attend), sm_scale defaults to 1/sqrt(D).
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * sm_scale
    allowed = attention_allowed_mask(q.shape[-2], k.shape[-2], causal=causal, key_mask=key_mask, device=q.device)
    if allowed is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        # A row with nothing to attend would be softmax(all -inf) = NaN, and its backward NaN too. Let such rows
        # attend everything (finite softmax), then zero them: the product rule sends zero gradient through.
        row_has_key = allowed.any(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(~(allowed | ~row_has_key), float("-inf")), dim=-1)
        probs = probs * row_has_key.to(probs.dtype)
    return torch.matmul(probs, v)


# ------------------------------------------------------------------------------------------------------------------
# Norm
# ------------------------------------------------------------------------------------------------------------------
def norm_reference(x, weight, eps=1e-5, residual=None):
    """iGPT norm y = h * rsqrt(mean(h^2) + eps) * weight with h = x (+ residual); no mean subtraction, no bias.

    x [..., C], weight [C]. fp16/bf16 compute in fp32 and round the output to x's dtype; float64 stays float64.
    With residual, h = x + residual is rounded to x's dtype first (it is returned and is what the norm sees):
    returns (y, h).
    """
    h = x if residual is None else x + residual
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    hf = h.to(compute)
    rstd = torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(compute)).to(h.dtype)
    return y if residual is None else (y, h)


# ------------------------------------------------------------------------------------------------------------------
# Palette embedding
# ------------------------------------------------------------------------------------------------------------------
def pixel_to_unit_table(device=None):
    """fp32 [256]: fl(fl(x / 127.5) - 1) for every uint8 x, with IEEE fp32 division computed on the CPU.

    A table, not arithmetic on the device: CUDA rewrites division by a constant as a reciprocal multiply, which
    rounds differently for some x. (igpt.palette.PIXEL_TO_UNIT holds the same values; igpt_kernels cannot import igpt.)
    """
    table = torch.arange(256, dtype=torch.float32) / torch.tensor(127.5, dtype=torch.float32) - 1.0
    return table if device is None else table.to(device)


def quantize_reference(pixels, centres):
    """Nearest centre id (int64 [...]) of uint8 pixels [..., 3] under the exact rule, ties -> lowest id.

    d_j = ((r - c_j0)^2 + (g - c_j1)^2) + (b - c_j2)^2 in fp32, every difference, square and sum rounded on its own
    (no fused multiply-add, not the expanded form ||x||^2 - 2 x.c + ||c||^2). Materialises [..., V] distances:
    the oracle, not a fast path.
    """
    unit = pixel_to_unit_table(pixels.device)[pixels.long()]  # [..., 3] fp32
    c = centres.to(torch.float32)
    d = None
    for i in range(3):
        diff = unit[..., i:i + 1] - c[:, i]
        sq = diff * diff  # CPU torch rounds the product (no contraction in an elementwise mul)
        d = sq if d is None else d + sq
    return torch.argmin(d, dim=-1)  # first index of the minimum: ties -> lowest id


def palette_embedding_reference(x, wte, wpe, *, centres=None, sos=None, bert_mask=None, pos_offset=0):
    """(h [B,N,C] in wte's dtype, ids int64 [B,N]) of the palette embedding (contract in docs/DESIGN.md).

    x: uint8 RGB [B,N,3] (quantized with `centres` [V,3]) or int64 ids [B,N].
    AR (sos [C]): h[:,0] = sos + wpe[p0], h[:,t] = wte[ids[:,t-1]] + wpe[p0+t];
    BERT (bert_mask [B,N] bool, True = masked): h[:,t] = (0 if masked else wte[ids[:,t]]) + wpe[p0+t];
    neither: h[:,t] = wte[ids[:,t]] + wpe[p0+t].
    """
    ids = quantize_reference(x, centres) if x.dtype == torch.uint8 else x
    n = ids.shape[1]
    pos = wpe[pos_offset:pos_offset + n]
    if sos is not None:
        tok = torch.cat([sos.expand(ids.shape[0], 1, -1), wte[ids[:, :-1]]], dim=1)
    else:
        tok = wte[ids]
        if bert_mask is not None:
            tok = tok.masked_fill(bert_mask[..., None], 0)
    return tok + pos, ids
