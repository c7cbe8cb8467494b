"""Fused attention numerics through the Triton interpreter (run: TRITON_INTERPRET=1 python -m pytest tests/interpret).

Accuracy rule (as FlashAttention's tests): against a float64 reference on the same (rounded) inputs, the kernel's
error may be at most twice the error of plain torch computing the same thing in the test dtype, plus a small atol.
Every test also checks, through `launch_counts`, that the Triton kernels ran rather than the CPU reference.
"""
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from igpt_kernels import attention, attention_reference
from igpt_kernels.attention import launch_counts

# bf16 (the training dtype) has its own, smaller grid below: test_bf16.
DTYPES = [torch.float32, torch.float16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}
HEAD_DIMS = [16, 32, 64, 96, 128]
LENGTHS = [1, 17, 64, 97, 130]


def _inputs(b, h, n_q, n_k, d, dtype, *, key_mask, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (n_q, n_k, n_k, n_q))
    mask = None
    if key_mask:
        mask = torch.rand(b, n_k, generator=gen) > 0.25
    return q, k, v, do, mask


def _run(fn, q, k, v, do, dtype, **kwargs):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(do.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _counts():
    return dict(launch_counts)


def _launched(before, name):
    return launch_counts[name] - before.get(name, 0)


def check_against_reference(b, h, n_q, n_k, d, dtype, *, causal, key_mask, seed=0, deterministic_variants=(False, True),
                            inputs=None):
    q, k, v, do, mask = inputs or _inputs(b, h, n_q, n_k, d, dtype, key_mask=key_mask, seed=seed)
    exact = _run(attention_reference, q, k, v, do, torch.float64, causal=causal, key_mask=mask)
    plain = _run(attention_reference, q, k, v, do, dtype, causal=causal, key_mask=mask)
    names = ("out", "dq", "dk", "dv")
    results = {}
    for deterministic in deterministic_variants:
        before = _counts()
        fused = _run(attention, q, k, v, do, dtype, causal=causal, key_mask=mask, deterministic=deterministic)
        assert _launched(before, "attn_fwd") == 1 and _launched(before, "attn_bwd_dkdv") == 1, "Triton did not run"
        assert _launched(before, "attn_bwd_dq") == (1 if deterministic else 0)
        for name, got, ref, base in zip(names, fused, exact, plain):
            assert got.dtype == dtype and got.shape == ref.shape, name
            assert torch.isfinite(got).all(), f"{name}: non-finite values (deterministic={deterministic})"
            err = (got.double() - ref).abs().max().item()
            base_err = (base.double() - ref).abs().max().item()
            bound = 2 * base_err + ATOL[dtype]
            assert err <= bound, (f"{name} (deterministic={deterministic}): max error {err:.3g} > 2 x plain torch "
                                  f"{base_err:.3g} + atol {ATOL[dtype]:g}")
        results[deterministic] = fused
    if len(results) == 2:
        # dK/dV come from the same pass in both variants; only where dQ is summed differs.
        for name, a, b_ in zip(names, results[False], results[True]):
            if name != "dq":
                assert torch.equal(a, b_), f"{name} differs between deterministic variants"
    return results


# The full D x N grid, square (Nq = Nk), causal x bidirectional x key mask, fp32 and fp16. Both backward variants run
# in every case. B=1/H=1 without a mask (B=2 with one, so masks differ per batch row) keeps the interpreter fast.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("key_mask", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_grid(causal, key_mask, d, n, dtype):
    check_against_reference(2 if key_mask else 1, 1, n, n, d, dtype, causal=causal, key_mask=key_mask,
                            seed=n * 1000 + d)


# KV-cache decode: Nq < Nk, causal aligned bottom-right (query i sees keys <= Nk - Nq + i).
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d", [32, 96], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (1, 17), (1, 130), (7, 7), (7, 64), (7, 97)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("key_mask", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_decode(causal, key_mask, n_q, n_k, d, dtype):
    check_against_reference(2 if key_mask else 1, 2, n_q, n_k, d, dtype, causal=causal, key_mask=key_mask,
                            seed=n_q * 7 + n_k)


def test_decode_matches_last_rows_of_full_causal():
    # Decoding the last Nq queries against the full cache equals the last Nq rows of full causal attention.
    q, k, v, _, _ = _inputs(1, 2, 40, 40, 32, torch.float32, key_mask=False, seed=3)
    full = attention(q, k, v, causal=True)
    last = attention(q[:, :, -7:], k, v, causal=True)
    torch.testing.assert_close(last, full[:, :, -7:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("d", [8, 40], ids=lambda d: f"D{d}")
def test_other_head_dims(d):
    # Any D up to 128 is padded to a power of two >= 16 inside the kernel (masked loads and stores).
    check_against_reference(1, 1, 33, 33, d, torch.float16, causal=True, key_mask=True, seed=d)


# bf16 under the interpreter relies on igpt_kernels._interpreter_compat (bf16 dots with fp32 accumulation, casts
# rounded to nearest even): a subset of the grid (every head-dim class, ragged lengths) plus decode, both backward
# variants in each case.
ATOL[torch.bfloat16] = 1e-3


@pytest.mark.parametrize("n,d", [(17, 32), (64, 64), (97, 96), (33, 128), (20, 40)], ids=lambda x: str(x))
@pytest.mark.parametrize("key_mask", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bf16(causal, key_mask, n, d):
    check_against_reference(2 if key_mask else 1, 1, n, n, d, torch.bfloat16, causal=causal, key_mask=key_mask,
                            seed=n * 1000 + d)


@pytest.mark.parametrize("n_q,n_k", [(1, 17), (7, 97)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bf16_decode(causal, n_q, n_k):
    check_against_reference(2, 2, n_q, n_k, 32, torch.bfloat16, causal=causal, key_mask=True, seed=n_q * 7 + n_k)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_strided_inputs_and_custom_scale(causal, deterministic):
    # q/k/v as views of one packed qkv projection [B, N, 3, H, D] (no .contiguous()), B=2, H=3, a custom sm_scale and
    # a non-contiguous upstream gradient: exercises every batch/head/row stride.
    b, n, h, d = 2, 45, 3, 32
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(b, n, 3, h, d, generator=gen)
    do = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)
    mask = torch.rand(b, n, generator=gen) > 0.3

    def split(t):
        return [t[:, :, i].transpose(1, 2) for i in range(3)]

    def run(fn, dtype, **kw):
        leaf = qkv.detach().to(dtype).requires_grad_()
        out = fn(*split(leaf), causal=causal, key_mask=mask, sm_scale=0.3, **kw)
        out.backward(do.to(dtype))
        return out.detach(), leaf.grad

    before = _counts()
    out, grad = run(attention, torch.float32, deterministic=deterministic)
    assert _launched(before, "attn_fwd") == 1 and _launched(before, "attn_bwd_dkdv") == 1
    ref_out, ref_grad = run(attention_reference, torch.float64)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Rows with no key to attend: output 0, gradients 0, no NaN.
# ---------------------------------------------------------------------------------------------------------------
def _fused_with_grads(q, k, v, do, **kwargs):
    return _run(attention, q, k, v, do, q.dtype, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fully_masked_batch_row(causal, deterministic, dtype):
    q, k, v, do, _ = _inputs(2, 2, 37, 37, 64, dtype, key_mask=False, seed=5)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1] = False  # batch row 1 attends nothing
    out, dq, dk, dv = _fused_with_grads(q, k, v, do, causal=causal, key_mask=mask, deterministic=deterministic)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
        assert (t[1] == 0).all(), f"{name} of the fully masked batch row is not 0"
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_mask=mask)
    torch.testing.assert_close(out[0].double(), ref[0], atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(37, 37), (7, 40), (1, 20)], ids=str)
def test_causal_rows_with_only_masked_keys(n_q, n_k, deterministic):
    # With causal decode and the first keys masked (e.g. left padding), the first queries see only masked keys.
    q, k, v, do, _ = _inputs(1, 2, n_q, n_k, 32, torch.float32, key_mask=False, seed=n_q)
    masked_prefix = n_k - n_q + min(3, n_q)  # queries 0..min(3,Nq)-1 see keys <= Nk-Nq+i < masked_prefix
    mask = torch.ones(1, n_k, dtype=torch.bool)
    mask[0, :masked_prefix] = False
    empty_rows = min(3, n_q)
    out, dq, dk, dv = _fused_with_grads(q, k, v, do, causal=True, key_mask=mask, deterministic=deterministic)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
    assert (out[:, :, :empty_rows] == 0).all() and (dq[:, :, :empty_rows] == 0).all()
    assert (dk[:, :, :masked_prefix] == 0).all() and (dv[:, :, :masked_prefix] == 0).all()
    exact = _run(attention_reference, q, k, v, do, torch.float64, causal=True, key_mask=mask)
    for got, ref in zip((out, dq, dk, dv), exact):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


# Hugely negative (finite) scores everywhere put every row's log-sum-exp far below -128 (base 2), so a probability
# recomputed for a row or column outside the valid range, exp2(0 - lse), overflows to inf; it must be selected away,
# never multiplied by the zero-loaded K/V/Q rows (inf * 0 = NaN). Nk = 40 leaves the interpreter's 32-key dK/dV tile
# and 16-key forward/dQ tiles ragged; Nq = 40 / 7 leaves the query tiles ragged too.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("n_q", [40, 7], ids=lambda n: f"Nq{n}")
@pytest.mark.parametrize("key_mask", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_very_negative_scores_on_ragged_tiles(causal, key_mask, n_q, dtype):
    b, n_k, d = 2, 40, 32
    q, k, v, do, mask = _inputs(b, 1, n_q, n_k, d, dtype, key_mask=key_mask, seed=n_q)
    gen = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    # Scores ~ -600 / sqrt(32) ~ -106, lse ~ -148 in base 2. The large common part sits in q, not k: a large common
    # key component would make dQ (a sum of dS * k over keys, with dS summing to 0) ill-conditioned.
    q = (600.0 * u + 0.1 * q.float()).to(dtype)
    k = (k.float() - (k.float() @ u)[..., None] * u - u).to(dtype)
    lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / d ** 0.5, dim=-1) * 1.4426950408889634
    assert lse.max() < -128, "the scores are not negative enough to overflow exp2(-lse)"
    check_against_reference(b, 1, n_q, n_k, d, dtype, causal=causal, key_mask=key_mask, inputs=(q, k, v, do, mask))


def _attention_configs(seen):
    return {name: meta for name, meta in seen["launched"] if name != "attn_bwd_preprocess_kernel"}


def test_deterministic_mode_never_autotunes(launch_spy):
    # deterministic=True launches the plain kernels at fixed_config (the interpreter's one config): no autotuner is
    # entered, whatever ran before (the default path fills the autotuner's cache first) and whatever the length.
    from igpt_kernels._attention_triton import INTERPRET_CONFIGS, fixed_config

    expected = {f"attn_{name}_kernel": tuple(zip(("BLOCK_M", "BLOCK_N"), INTERPRET_CONFIGS[kind][:2]))
                for kind, name in (("fwd", "fwd"), ("dkdv", "bwd_dkdv"), ("dq", "bwd_dq"))}
    assert fixed_config("dkdv", None, 32, 4)["BLOCK_N"] == INTERPRET_CONFIGS["dkdv"][1]
    for deterministic, n in ((False, 40), (True, 40), (True, 17), (True, 130), (False, 17)):
        q, k, v, do, _ = _inputs(1, 1, n, n, 32, torch.float32, key_mask=False, seed=n)
        launch_spy["autotuned"].clear()
        launch_spy["launched"].clear()
        _run(attention, q, k, v, do, torch.float32, causal=True, deterministic=deterministic)
        if deterministic:
            assert launch_spy["autotuned"] == [], f"N={n}: an autotuner ran in deterministic mode"
            assert _attention_configs(launch_spy) == expected
        else:  # the spy can see the autotuner: the default path goes through it
            assert launch_spy["autotuned"] == ["attn_fwd_kernel", "attn_bwd_dkdv_kernel"]
            assert _attention_configs(launch_spy) == {k: v for k, v in expected.items() if "dq" not in k}


def test_no_quadratic_tensor_allocated():
    # The Triton path must not materialise scores or probabilities: no torch op may produce a tensor with
    # Nq * Nk elements per head. With D=16 << N=130, any [.., N, N] tensor would stand out.
    class RecordSizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    b, h, n, d = 1, 2, 130, 16
    q, k, v, do, mask = _inputs(b, h, n, n, d, torch.float32, key_mask=True, seed=0)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    for deterministic in (False, True):
        with RecordSizes() as rec:
            out = attention(*leaves, causal=True, key_mask=mask, deterministic=deterministic)
            out.backward(do)
        assert rec.largest > 0, "the recorder saw no tensors: the check would pass vacuously"
        assert rec.largest < n * n, f"a tensor of {rec.largest} elements (>= N*N = {n * n}) was allocated"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("causal,key_mask", list(itertools.product([False, True], [False, True])))
def test_long_sequence(causal, key_mask, dtype):
    check_against_reference(1, 1, 1025, 1025, 64, dtype, causal=causal, key_mask=key_mask, seed=1025)
