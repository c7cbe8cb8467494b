"""Shared checks that FusedDecoder is a drop-in for Decoder (used by the CPU and the interpreter test processes)."""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from igpt import Decoder, FusedDecoder, IGPTConfig, Palette


def tiny_config(**kw):
    return IGPTConfig(**{**dict(n_layer=2, n_embd=32, n_head=2, resolution=4), **kw})


def randomized_pair(cfg, seed=0):
    """A Decoder with every parameter random (zero-init heads would hide mistakes) and a FusedDecoder loaded from it."""
    g = torch.Generator().manual_seed(seed)
    eager = Decoder(cfg)
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fused = FusedDecoder(cfg)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def grads(model):
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def assert_same_logits_and_grads(eager, fused, ids, bert_mask=None, atol=2e-5):
    ref_logits = eager(ids, bert_mask=bert_mask)
    out = fused(ids, bert_mask=bert_mask)
    torch.testing.assert_close(out, ref_logits, rtol=1e-5, atol=atol)
    eager.zero_grad()
    fused.zero_grad()
    eager.loss(ids, bert_mask).backward()
    fused.loss(ids, bert_mask).backward()
    ref, got = grads(eager), grads(fused)
    assert ref.keys() == got.keys()
    for k in ref:
        if ref[k] is None or got[k] is None:  # e.g. the SOS vector of a BERT model: unused by both
            assert ref[k] is None and got[k] is None, f"grad of {k}: {ref[k]} vs {got[k]}"
            continue
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"grad of {k}: {m}")


def random_palette(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Palette(torch.rand(n, 3, generator=g) * 2 - 1)


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside it (e.g. `aten._local_scalar_dense`: a host sync)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
