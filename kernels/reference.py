"""Plain-torch references of the fused ops: the CPU path and the test oracle.

Each op gets one section. References are written for clarity and exactness, not speed: they run in any floating
dtype (float64 included, for the test oracle), are differentiable by autograd, and follow the same contracts as the
fused entry points (see DESIGN.md). Input validation lives in the fused entry points, not here.
"""
import math

import torch

__all__ = ["attention_reference", "attention_allowed_mask"]


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
