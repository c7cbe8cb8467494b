"""The kernels as torch custom ops, under the interpreter: torch.library.opcheck on each op (schema, fake tensors,
autograd registration, AOT dispatch), and torch.compile(fullgraph=True) of a FusedDecoder training step whose
compiled graph launches the Triton kernels."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import igpt_kernels  # noqa: F401  (registers the torch.ops.igpt ops)
from fused_parity import grads, randomized_pair, tiny_config
from igpt_kernels.attention import launch_counts as attention_launches
from igpt_kernels.embedding import launch_counts as embedding_launches
from igpt_kernels.norm import launch_counts as norm_launches

ops = torch.ops.igpt
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def rand(*shape, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=TEST_UTILS)


@pytest.mark.parametrize("causal, masked, deterministic", [(True, False, False), (False, True, True)])
def test_attention_ops(causal, masked, deterministic):
    q = rand(1, 2, 5, 16, requires_grad=True, seed=1)
    k = rand(1, 2, 7, 16, requires_grad=True, seed=2)
    v = rand(1, 2, 7, 16, requires_grad=True, seed=3)
    key_mask = torch.tensor([[True, False, True, True, False, True, True]]) if masked else None
    opcheck(ops.attention_fwd.default, (q, k, v, key_mask, causal, 0.25, deterministic))
    with torch.no_grad():  # the backward op is itself not differentiable (once_differentiable)
        o, lse = ops.attention_fwd(q, k, v, key_mask, causal, 0.25, deterministic)
    do = rand(*o.shape, seed=4)
    opcheck(ops.attention_bwd.default, (do, q.detach(), k.detach(), v.detach(), o, lse, key_mask, causal, 0.25,
                                        deterministic))


@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_ops(with_residual):
    x = rand(2, 3, 24, requires_grad=True, seed=1)
    w = rand(24, requires_grad=True, seed=2)
    r = rand(2, 3, 24, requires_grad=True, seed=3) if with_residual else None
    opcheck(ops.norm_fwd.default, (x, w, r, 1e-5))
    with torch.no_grad():
        _, h, rstd = ops.norm_fwd(x, w, r, 1e-5)
    dy, dh_out = rand(*x.shape, seed=4), (rand(*x.shape, seed=5) if with_residual else None)
    opcheck(ops.norm_bwd.default, (dy, dh_out, (h if with_residual else x).detach(), w.detach(), rstd,
                                   with_residual))


@pytest.mark.parametrize("mode", ["ar_ids", "bert_pixels"])
def test_palette_embedding_ops(mode):
    wte = rand(11, 16, requires_grad=True, seed=1)
    wpe = rand(9, 16, requires_grad=True, seed=2)
    if mode == "ar_ids":
        x = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
        centres, sos, bert_mask = None, rand(16, requires_grad=True, seed=4), None
    else:
        x = torch.randint(0, 256, (2, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        centres = torch.rand(11, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1
        sos, bert_mask = None, torch.rand(2, 5, generator=torch.Generator().manual_seed(5)) < 0.4
    opcheck(ops.palette_embedding_fwd.default, (x, wte, wpe, centres, sos, bert_mask, 2))
    with torch.no_grad():
        _, ids = ops.palette_embedding_fwd(x, wte, wpe, centres, sos, bert_mask, 2)
    dh = rand(2, 5, 16, seed=6)
    opcheck(ops.palette_embedding_bwd.default, (dh, ids, bert_mask, sos is not None, 11, 9, 2, True, True))


def launches():
    return tuple(sum(c.values()) for c in (attention_launches, norm_launches, embedding_launches))


def test_compiled_fused_decoder_runs_the_kernels():
    cfg = tiny_config()
    eager, fused = randomized_pair(cfg)
    ids = torch.randint(0, 512, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled_loss = torch.compile(fused.loss, fullgraph=True)  # fullgraph: any graph break is an error
    before = launches()
    loss = compiled_loss(ids)
    loss.backward()
    after = launches()
    assert all(a > b for a, b in zip(after, before)), f"launches (attention, norm, embedding): {before} -> {after}"
    assert attention_launches["attn_bwd_dkdv"] > 0 and norm_launches["norm_bwd"] > 0
    assert embedding_launches["embed_bwd_wte"] > 0

    ref = eager.loss(ids)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    expected, got = grads(eager), grads(fused)
    for name in expected:
        assert (expected[name] is None) == (got[name] is None), name
        if expected[name] is not None:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
