"""The interpreter half of the suite really interprets: Triton kernels run on CPU tensors in this process."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * alpha + y, mask=mask)


def test_triton_kernels_run_on_cpu_tensors():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    x, y = torch.randn(1000), torch.randn(1000)
    out = torch.full_like(x, float("nan"))
    _scaled_add[(triton.cdiv(1000, 256),)](x, y, out, 1000, 0.5, BLOCK=256)
    torch.testing.assert_close(out, 0.5 * x + y)


# ---------------------------------------------------------------------------------------------------------------
# bf16 under the interpreter. triton's interpreter keeps bf16 as raw uint16 bits and, unpatched, multiplies those
# integers in tl.dot, truncates fp32 -> bf16 casts and does integer arithmetic on the bits;
# igpt_kernels._interpreter_compat fixes that (applied by every kernel module, and here).
# ---------------------------------------------------------------------------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402

from igpt_kernels import _interpreter_compat  # noqa: E402

_interpreter_compat.apply()


def _all_bf16():
    return torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _bits(t):
    return t.view(torch.int16)


@triton.jit
def _dot_tile(A, B, ACC, OUT, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tile = r[:, None] * BLOCK + r[None, :]
    out = tl.dot(tl.load(A + tile), tl.load(B + tile), tl.load(ACC + tile))
    tl.store(OUT + tile, out)


def test_bf16_dot_is_bf16_products_with_fp32_accumulation():
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).bfloat16() for _ in range(2))
    acc = torch.randn(16, 16, generator=gen)
    out = torch.full((16, 16), float("nan"))
    _dot_tile[(1,)](a, b, acc, out, BLOCK=16)
    exact = (a.double() @ b.double() + acc.double()).float()  # bf16 products are exact; fp32 sums round a little
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-5)


@triton.jit
def _copy(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=ok, other=0.0), mask=ok)


def test_bf16_load_store_round_trip_is_bit_exact():
    x = _all_bf16()[:-5]  # every bit pattern (NaNs and subnormals included), a ragged tail for the mask
    y = torch.zeros_like(x)
    _copy[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    assert torch.equal(_bits(y), _bits(x))


@triton.jit
def _convert(X, Y, N, RTZ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + offs, mask=ok)
    if RTZ:
        y = x.to(Y.dtype.element_ty, fp_downcast_rounding="rtz")
    else:
        y = x.to(Y.dtype.element_ty)
    tl.store(Y + offs, y, mask=ok)


def _run_convert(x, dtype, rtz=False):
    y = torch.zeros(x.shape, dtype=dtype)
    _convert[(triton.cdiv(x.numel(), 8192),)](x, y, x.numel(), RTZ=rtz, BLOCK=8192)
    return y


def _special_f32():
    # Ties to even either way, values just off a tie, subnormal bf16 results, overflow to inf, inf, zeros, random.
    ulp = 2.0 ** -7
    vals = [1 + ulp / 2, 1 + 1.5 * ulp, 1 + ulp / 2 + 2 ** -20, -(1 + 1.5 * ulp), 9.99994610111476e-41, -1e-40,
            2.0 ** -133, 3.3961e38, 3.4e38, float("inf"), -float("inf"), 0.0, -0.0]
    gen = torch.Generator().manual_seed(1)
    return torch.cat([torch.tensor(vals), torch.randn(20000, generator=gen) * 10,
                      torch.randn(2000, generator=gen) * 1e-39])


# Signalling-NaN bit patterns make numpy warn when the fp32 -> fp64 step quiets them (as the GPU does).
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_bf16_casts_round_to_nearest_even_and_widen_exactly():
    x = _special_f32()
    got = _run_convert(x, torch.bfloat16)
    assert torch.equal(_bits(got), _bits(x.bfloat16())), "fp32 -> bf16 must round to nearest even, as torch does"
    nan = _run_convert(torch.tensor([float("nan"), -float("nan")]), torch.bfloat16)
    assert nan.isnan().all()

    every = _all_bf16()
    finite = ~every.isnan()
    for dtype in (torch.float32, torch.float64):
        wide = _run_convert(every, dtype)
        assert torch.equal(wide[finite], every[finite].to(dtype)), f"bf16 -> {dtype} must be exact"
        assert wide[~finite].isnan().all()
    narrow = _run_convert(every[finite].double(), torch.bfloat16)
    assert torch.equal(_bits(narrow), _bits(every[finite])), "fp64 -> bf16 of bf16 values must be exact"


def test_bf16_from_fp64_rounds_once():
    # 1 + 2^-8 + 2^-30 lies just above the tie between 1 and 1 + 2^-7: rounding to fp32 first (1 + 2^-8, a tie)
    # and then to bf16 would give 1.0 (ties to even); rounding once gives 1 + 2^-7.
    x = torch.tensor([1 + 2 ** -8 + 2 ** -30, -(1 + 2 ** -8 + 2 ** -30), 1 + 2 ** -8, 1e300, -1e-300],
                     dtype=torch.float64)
    got = _run_convert(x, torch.bfloat16)
    expected = torch.tensor([1 + 2 ** -7, -(1 + 2 ** -7), 1.0, float("inf"), -0.0]).bfloat16()
    assert torch.equal(_bits(got), _bits(expected))


def test_bf16_round_toward_zero():
    x = _special_f32()[:-2000]
    got = _run_convert(x, torch.bfloat16, rtz=True)
    truncated = (x.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(_bits(got), _bits(truncated))


def test_bf16_int_casts():
    ints = torch.tensor([0, 1, -3, 255, 257, 2 ** 24 - 1, -(2 ** 20) - 3], dtype=torch.int32)
    assert torch.equal(_bits(_run_convert(ints, torch.bfloat16)), _bits(ints.bfloat16()))
    b = torch.tensor([0.0, 1.5, -2.75, 300.0, -1e6]).bfloat16()
    assert torch.equal(_run_convert(b, torch.int32), b.to(torch.int32))


@triton.jit
def _elementwise(X, Y, ADD, MUL, NEG, LESS, MAX, CLAMP, FMA, REDUCE, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    y = tl.load(Y + offs)
    tl.store(ADD + offs, x + y)
    tl.store(MUL + offs, x * y)
    tl.store(NEG + offs, -x)
    tl.store(LESS + offs, (x < y).to(tl.int8))
    tl.store(MAX + offs, tl.maximum(x, y))
    tl.store(CLAMP + offs, tl.clamp(x, y, y + 1.0))
    tl.store(FMA + offs, tl.fma(x, y, y))
    tl.store(REDUCE + 0, tl.sum(x, axis=0))
    tl.store(REDUCE + 1, tl.max(x, axis=0))
    tl.store(REDUCE + 2, tl.min(x, axis=0))
    tl.store(REDUCE + 3, tl.argmin(x, axis=0).to(tl.bfloat16))


def test_bf16_elementwise_ops_and_reductions_compute_in_fp32_and_round():
    gen = torch.Generator().manual_seed(2)
    x, y = (torch.randn(256, generator=gen).bfloat16() for _ in range(2))
    outs = [torch.zeros_like(x) for _ in range(3)] + [torch.zeros(256, dtype=torch.int8)]
    outs += [torch.zeros_like(x) for _ in range(3)] + [torch.zeros(4, dtype=torch.bfloat16)]
    _elementwise[(1,)](x, y, *outs, BLOCK=256)
    add, mul, neg, less, mx, clamp, fma, red = outs
    xf, yf = x.float(), y.float()
    assert torch.equal(_bits(add), _bits(x + y)) and torch.equal(_bits(mul), _bits(x * y))
    assert torch.equal(_bits(neg), _bits(-x)) and torch.equal(less, (x < y).to(torch.int8))
    assert torch.equal(_bits(mx), _bits(torch.maximum(x, y)))
    assert torch.equal(_bits(clamp), _bits(torch.minimum(torch.maximum(x, y), y + 1.0)))
    assert torch.equal(_bits(fma), _bits((xf * yf + yf).bfloat16()))
    torch.testing.assert_close(red[0], xf.sum().bfloat16(), atol=0, rtol=2 ** -8)
    assert red[1] == x.max() and red[2] == x.min() and red[3] == x.float().argmin()


def test_bf16_fixes_are_installed_only_where_the_interpreter_is_wrong():
    # Each fix keeps a probe: it must fail on triton's own function (else the fix would be dead code) and pass on
    # the fix (so a triton that computes bf16 correctly passes it and keeps its own function).
    from triton.runtime import interpreter

    fixed = [getattr(interpreter.InterpreterBuilder, name) for name in
             ("create_dot", "cast_impl", "create_fp_to_fp", "binary_op", "unary_op", "ternary_op", "create_fma")]
    fixed += [interpreter.ReduceOps.sum, interpreter.ReduceOps.min_max]
    for fn in fixed:
        assert getattr(fn, "_igpt_bf16_fix", False), f"{fn.__name__}: not fixed"
        assert not _interpreter_compat._probe_passes(fn._igpt_probe, fn._igpt_original), fn.__name__
        assert _interpreter_compat._probe_passes(fn._igpt_probe, fn), fn.__name__
    _interpreter_compat.apply()  # idempotent: every kernel module calls it
    assert interpreter.InterpreterBuilder.create_dot._igpt_original is fixed[0]._igpt_original


def test_bf16_fixes_are_a_no_op_without_the_interpreter():
    code = ("from igpt_kernels import _interpreter_compat as c; c.apply(); "
            "from triton.runtime import interpreter as i; "
            "assert not hasattr(i.InterpreterBuilder.create_dot, '_igpt_bf16_fix'); print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
