"""Split-KV decode attention (Nq <= 16, no gradient) through the Triton interpreter, against a float64 reference.

Accuracy rule as in test_attention.py: the kernel's error may be at most twice plain torch's error in the test dtype,
plus a small atol. Under the interpreter the split count is `_decode_triton.INTERPRET_SPLITS` per head with 16-key
tiles, so these shapes span several splits, ragged last splits and ragged last tiles.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attention import ATOL, DTYPES, _inputs  # noqa: E402

from igpt_kernels import _decode_triton, attention, attention_reference  # noqa: E402
from igpt_kernels.attention import launch_counts  # noqa: E402
from igpt_kernels.reference import attention_allowed_mask  # noqa: E402


def _ids(x):
    return str(x).removeprefix("torch.")


def _launched(fn):
    before = dict(launch_counts)
    out = fn()
    return out, {k: launch_counts[k] - before.get(k, 0) for k in launch_counts if launch_counts[k] != before.get(k, 0)}


def assert_within_bound(name, got, exact, plain, dtype):
    assert got.dtype == dtype and got.shape == exact.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - exact).abs().max().item()
    base_err = (plain.double() - exact).abs().max().item()
    bound = 2 * base_err + ATOL[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x plain torch {base_err:.3g} + atol {ATOL[dtype]:g}"


def check_decode(b, h, n_q, n_k, d, dtype, *, causal, key_mask, seed=0):
    q, k, v, _, mask = _inputs(b, h, n_q, n_k, d, dtype, key_mask=key_mask, seed=seed)
    exact = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_mask=mask)
    plain = attention_reference(q, k, v, causal=causal, key_mask=mask)
    with torch.no_grad():
        out, launched = _launched(lambda: attention(q, k, v, causal=causal, key_mask=mask))
    assert launched == {"attn_decode_split": 1, "attn_decode_combine": 1}, f"the decode kernels did not run: {launched}"
    assert_within_bound("out", out, exact, plain, dtype)
    # [B, Nq, H, D] memory: the model's output projection reads [B, Nq, H*D] without a copy
    assert out.transpose(1, 2).is_contiguous()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d", [32, 96], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("n_q", [1, 3, 16], ids=lambda n: f"Nq{n}")
@pytest.mark.parametrize("key_mask", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_decode_grid(causal, key_mask, n_q, d, dtype):
    # 97 keys in 16-key tiles: 7 tiles in 3 splits of 3, 3 and 1 tiles, the last tile holding one key.
    assert _decode_triton.split_plan(4, 97, 16, _decode_triton.INTERPRET_SPLITS * 4) == (3, 48)
    check_decode(2, 2, n_q, 97, d, dtype, causal=causal, key_mask=key_mask, seed=n_q * 100 + d)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
def test_decode_head_dims(d, dtype):
    check_decode(1, 2, 3, 97, d, dtype, causal=True, key_mask=True, seed=d)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_decode_one_key(causal):
    check_decode(2, 2, 1, 1, 32, torch.float32, causal=causal, key_mask=False)


@pytest.mark.parametrize("b,h,n_q,n_k,d,dtype,causal,key_mask", [
    (1, 2, 1, 1024, 64, torch.float16, True, True),
    (1, 1, 16, 1024, 32, torch.float32, False, False),
    (1, 1, 3, 4096, 64, torch.float32, True, True),
], ids=["Nk1024-fp16-Nq1", "Nk1024-fp32-Nq16", "Nk4096-fp32-Nq3"])
def test_decode_long(b, h, n_q, n_k, d, dtype, causal, key_mask):
    check_decode(b, h, n_q, n_k, d, dtype, causal=causal, key_mask=key_mask, seed=n_k)


@pytest.mark.parametrize("splits", [1, 2, 5, 100])
def test_split_counts(monkeypatch, splits):
    # One split (no merging), two, five (7 tiles: the last split short), and more splits than tiles (clamped to 7).
    monkeypatch.setattr(_decode_triton, "INTERPRET_SPLITS", splits)
    check_decode(1, 2, 3, 97, 32, torch.float32, causal=True, key_mask=True, seed=splits)


def test_log_sum_exp():
    # The op's second output: log2 of the softmax denominator (base-2 units, as the main forward), +inf where a row
    # sees no key.
    q, k, v, _, mask = _inputs(2, 2, 3, 50, 32, torch.float32, key_mask=True, seed=4)
    mask[1] = False
    with torch.no_grad():
        out, lse = torch.ops.igpt.attention_decode(q, k, v, mask, True, 0.2)
    allowed = attention_allowed_mask(3, 50, causal=True, key_mask=mask)
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.2).masked_fill(~allowed, float("-inf"))
    expected = torch.logsumexp(scores, dim=-1) / math.log(2)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    torch.testing.assert_close(lse[0].double(), expected[0], atol=1e-5, rtol=1e-6)
    assert (out[1] == 0).all()


def test_rows_with_no_visible_key():
    # Causal decode with the first keys masked (left padding): the first queries see only masked keys, and batch
    # row 1 attends nothing at all. Those rows give 0, no NaN.
    b, h, n_q, n_k = 2, 2, 5, 40
    q, k, v, _, _ = _inputs(b, h, n_q, n_k, 32, torch.float32, key_mask=False, seed=9)
    mask = torch.ones(b, n_k, dtype=torch.bool)
    mask[0, :n_k - n_q + 2] = False  # queries 0 and 1 of batch row 0 see only masked keys
    mask[1] = False
    with torch.no_grad():
        out, launched = _launched(lambda: attention(q, k, v, causal=True, key_mask=mask))
    assert launched["attn_decode_split"] == 1
    assert torch.isfinite(out).all()
    assert (out[0, :, :2] == 0).all() and (out[1] == 0).all()
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, key_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_strided_cache_views(causal):
    # As the sampler calls it: k/v are views cache[:, :, :length] of a longer KV cache, q a view of the packed qkv
    # projection [B, Nq, 3, H, D]; a custom sm_scale.
    b, h, d, n_ctx, length, n_q = 2, 3, 32, 80, 45, 2
    gen = torch.Generator().manual_seed(12)
    k_cache, v_cache = torch.randn(2, b, h, n_ctx, d, generator=gen)
    qkv = torch.randn(b, n_q, 3, h, d, generator=gen)
    q = qkv[:, :, 0].transpose(1, 2)
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    mask = torch.rand(b, length, generator=gen) > 0.3
    assert not (q.is_contiguous() or k.is_contiguous())
    with torch.no_grad():
        out, launched = _launched(lambda: attention(q, k, v, causal=causal, key_mask=mask, sm_scale=0.3))
    assert launched["attn_decode_split"] == 1
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_mask=mask, sm_scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_dispatch():
    # Automatic: the decode kernels for Nq <= 16 without gradients; the main kernel when a gradient is needed, for
    # 17 queries, or with split_kv=False.
    q, k, v, _, _ = _inputs(1, 1, 17, 20, 16, torch.float32, key_mask=False, seed=1)
    decode = {"attn_decode_split": 1, "attn_decode_combine": 1}
    with torch.no_grad():
        assert _launched(lambda: attention(q[:, :, :16], k, v, causal=True))[1] == decode
        assert _launched(lambda: attention(q[:, :, :16], k, v, causal=True, split_kv=True))[1] == decode
        assert _launched(lambda: attention(q[:, :, :16], k, v, causal=True, split_kv=False))[1] == {"attn_fwd": 1}
        assert _launched(lambda: attention(q, k, v, causal=True))[1] == {"attn_fwd": 1}
    # grad mode on, but no input requires grad: nothing to differentiate
    assert _launched(lambda: attention(q[:, :, :1], k, v, causal=True))[1] == decode
    leaf = q[:, :, :1].clone().requires_grad_()
    out, launched = _launched(lambda: attention(leaf, k, v, causal=True))
    assert launched == {"attn_fwd": 1} and out.requires_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_same_result_with_and_without_split_kv(dtype):
    q, k, v, _, mask = _inputs(2, 2, 4, 70, 64, dtype, key_mask=True, seed=2)
    with torch.no_grad():
        split = attention(q, k, v, causal=True, key_mask=mask)
        main = attention(q, k, v, causal=True, key_mask=mask, split_kv=False)
    torch.testing.assert_close(split, main, atol=ATOL[dtype] * 2, rtol=1e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("causal, masked", [(True, False), (False, True)])
def test_attention_decode_op(causal, masked):
    # schema, fake implementation (the [B, Nq, H, D] output strides included) and AOT dispatch of the custom op
    q, k, v, _, mask = _inputs(1, 2, 3, 7, 16, torch.float32, key_mask=masked, seed=8)
    torch.library.opcheck(torch.ops.igpt.attention_decode.default, (q, k, v, mask, causal, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
