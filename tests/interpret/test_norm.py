"""Fused norm numerics through the Triton interpreter (run: TRITON_INTERPRET=1 python -m pytest tests/interpret).

Accuracy rule (as tests/interpret/test_attention.py): against a float64 reference on the same (rounded) inputs, the
kernel's error may be at most twice the error of plain torch computing the same thing in the test dtype, plus a small
atol. Every test checks, through `launch_counts`, that the Triton kernels ran rather than the CPU reference.
"""
import pytest
import torch

from igpt_kernels import norm, norm_reference
from igpt_kernels.norm import launch_counts

DTYPES = [torch.float32, torch.float16]  # bf16: test_bf16 below
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _inputs(shape, dtype, *, residual, seed):
    gen = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = torch.randn(shape, generator=gen) * 2 + 0.5  # a mean offset: the norm must not subtract it
    w = 1 + 0.5 * torch.randn(c, generator=gen)
    r = torch.randn(shape, generator=gen) if residual else None
    dy = torch.randn(shape, generator=gen)
    dh = torch.randn(shape, generator=gen) if residual else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(r), cast(dy), cast(dh)


def _run(fn, x, w, r, dy, dh, dtype, eps=1e-5):
    """(outputs..., grads...) of fn at `dtype`: forward, then backward of <y, dy> (+ <h, dh>)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w) + ((r,) if r is not None else ())]
    out = fn(leaves[0], leaves[1], eps, residual=leaves[2] if r is not None else None)
    outs = out if isinstance(out, tuple) else (out,)
    grads = (dy.to(dtype),) + ((dh.to(dtype),) if r is not None else ())
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def check_against_reference(shape, dtype, *, residual, seed=0, eps=1e-5):
    x, w, r, dy, dh = _inputs(shape, dtype, residual=residual, seed=seed)
    before = dict(launch_counts)
    fused = _run(norm, x, w, r, dy, dh, dtype, eps)
    for name in ("norm_fwd", "norm_bwd"):
        assert launch_counts[name] == before.get(name, 0) + 1, f"{name}: the Triton kernel did not run"
    exact = _run(norm_reference, x, w, r, dy, dh, torch.float64, eps)
    plain = _run(norm_reference, x, w, r, dy, dh, dtype, eps)
    names = ["y", "h"][:1 + residual] + ["dx", "dweight", "dresidual"][:2 + residual]
    for name, got, ref, base in zip(names, fused, exact, plain):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert torch.isfinite(got).all(), name
        err = (got.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        bound = 2 * base_err + ATOL[dtype] * max(1.0, ref.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > 2 x plain torch {base_err:.3g} + atol"
    return fused


# Odd widths (not a power of two: masked tails) and odd row counts; 4-D, 3-D and 2-D activations. Row counts above
# the interpreter's 3 backward programs make each program walk several rows and exercise the partial-dg reduction.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("width", [96, 200, 520])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 9), (3, 1, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_grid(residual, lead, width, dtype):
    check_against_reference((*lead, width), dtype, residual=residual, seed=width + len(lead))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_igpt_xl_width(residual):
    # C = 3072 (iGPT-XL) pads to BLOCK_C = 4096; 4096 itself has no tail.
    check_against_reference((5, 3072), torch.float32, residual=residual, seed=1)
    check_against_reference((3, 4096), torch.float16, residual=residual, seed=2)


def test_tiny_width_and_large_eps():
    check_against_reference((4, 1), torch.float32, residual=False, eps=0.5)
    check_against_reference((6, 3), torch.float32, residual=True, eps=1e-2)


# bf16 under the interpreter relies on igpt_kernels._interpreter_compat (casts rounded to nearest even).
ATOL[torch.bfloat16] = 1e-3


@pytest.mark.parametrize("width", [96, 200, 520, 4096])
@pytest.mark.parametrize("lead", [(7,), (2, 9), (3, 1, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_bf16(residual, lead, width):
    fused = check_against_reference((*lead, width), torch.bfloat16, residual=residual, seed=width + len(lead))
    x, w, r, _, _ = _inputs((*lead, width), torch.bfloat16, residual=residual, seed=width + len(lead))
    y_plain = norm_reference(x, w, residual=r)
    # Same fp32 math rounded once to nearest even: bit-equal to plain torch, but for a rare one-ulp flip where the
    # fp32 row sums (another order) straddle a rounding boundary. Truncating casts would differ in about half.
    for got, plain in zip(fused, y_plain if residual else (y_plain,)):
        assert (got != plain).double().mean().item() < 1e-3, "bf16 results are not rounded to nearest even"
        torch.testing.assert_close(got, plain, atol=0, rtol=2 ** -7)
    if residual:
        assert torch.equal(fused[1], x + r), "h must be x + residual rounded to nearest even, as torch adds them"


def test_residual_output_is_the_rounded_sum_and_y_is_its_norm():
    x, w, r, _, _ = _inputs((5, 200), torch.float16, residual=True, seed=4)
    y, h = norm(x, w, residual=r)
    assert torch.equal(h, x + r), "h must be x + residual rounded to the storage dtype, as torch adds them"
    torch.testing.assert_close(y, norm(h, w), atol=0, rtol=0)


def test_strided_input_and_fp32_weight_with_fp16_activations():
    # x a transposed view (non-unit column stride -> copied), dy non-contiguous, weight kept in fp32 (mixed precision).
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(200, 9, generator=gen)
    w = (1 + 0.3 * torch.randn(200, generator=gen)).requires_grad_()
    x = base.half().t().requires_grad_()  # [9, 200], stride (1, 9)
    dy = torch.randn(200, 9, generator=gen).half().t()
    before = dict(launch_counts)
    y = norm(x, w)
    y.backward(dy)
    assert launch_counts["norm_fwd"] == before.get("norm_fwd", 0) + 1
    assert y.dtype == torch.float16 and w.grad.dtype == torch.float32
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = norm_reference(xr, wr)
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("used", ["y_only", "h_only"])
def test_residual_with_one_output_unused(used):
    # An output that does not reach the loss gets no gradient (None into the backward): the other one must still
    # give exact gradients.
    x, w, r, dy, dh = _inputs((7, 96), torch.float32, residual=True, seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    ref_leaves = [t.double().requires_grad_() for t in (x, w, r)]
    for fn, (a, b, c) in ((norm, leaves), (norm_reference, ref_leaves)):
        y, h = fn(a, b, residual=c)
        if used == "y_only":
            (y * dy.to(y.dtype)).sum().backward()
        else:
            (h * dh.to(h.dtype)).sum().backward()
    for got, ref in zip(leaves, ref_leaves):
        if ref.grad is None:  # h alone does not depend on the weight
            assert got.grad is None or (got.grad == 0).all()
        else:
            torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(leaves[0].grad, leaves[2].grad)
