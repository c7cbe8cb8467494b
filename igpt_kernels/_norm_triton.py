"""Triton kernels of the iGPT norm (RMS-style, optional fused residual add), imported on first use.

    forward:  h = x (+ r);  rstd = rsqrt(mean(h^2) + eps);  y = h * rstd * g
    backward: gy = dy * g;  dh = rstd * (gy - h * rstd^2 * mean(h * gy)) (+ dh_out);  dg = sum_rows dy * h * rstd

One row lives in registers as a single [BLOCK_C] vector (BLOCK_C = next power of two >= C), so a row is read once
per pass; iGPT-XL's C = 3072 needs BLOCK_C = 4096. All math is fp32 whatever the storage dtype. The forward saves
rstd per row (fp32) for the backward. With a residual, h is rounded to the storage dtype before the norm sees it,
as the unfused `norm(x + r)` does, and it is stored for the next block.

dg is reduced without atomics: each backward program walks a fixed, strided set of rows, accumulates its share of
dg in fp32 registers and writes it to row `pid` of a [programs, C] fp32 buffer; one torch sum over the programs then
gives dg. For a fixed grid the summation order is fixed, so dg is bit-reproducible.
"""
import triton
import triton.language as tl

from . import _interpreter_compat

_interpreter_compat.apply()

# num_warps per row width (BLOCK_C), per target. A row is one vector spread over the warps: wide rows need more
# warps to stay under ~32 fp32 values per thread per live vector (the backward keeps h, dy, g and the dg partial).
# Hopper has more registers per SM in flight and benefits from the extra warps a little earlier. Every entry is
# compiled by tests/test_norm_embedding_compile.py (no spills, shared memory within limits).
NUM_WARPS = {
    80: {128: 1, 256: 2, 512: 4, 1024: 4, 2048: 8, 4096: 8, 8192: 16},
    90: {128: 1, 256: 2, 512: 4, 1024: 8, 2048: 8, 4096: 16, 8192: 16},
}
MIN_BLOCK_C = 128
MAX_BLOCK_C = 8192
# Backward programs per SM: enough rows in flight to hide latency, few enough that the [programs, C] dg buffer and
# its final sum stay small.
PROGRAMS_PER_SM = 4
# Under the interpreter a few programs, each walking several rows, exercise the strided row loop and the partial-dg
# reduction just like the GPU grid does.
INTERPRET_PROGRAMS = 3


def block_c(n_cols):
    return max(MIN_BLOCK_C, triton.next_power_of_2(n_cols))


@triton.jit
def norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    N_COLS, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < N_COLS
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        # Round h to the storage dtype before using it: y must equal norm() of the h this kernel returns.
        h_store = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h_store, mask=ok)
        h = h_store.to(tl.float32)
    else:
        h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / N_COLS
    rstd = 1.0 / tl.sqrt_rn(mean_sq + eps)  # correctly rounded: the approximate rsqrt costs an ulp or two for nothing
    tl.store(RSTD + row, rstd)
    g = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (h * rstd * g).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def norm_bwd_kernel(
    DY, DH_OUT, H, W, RSTD, DX, DR, DG_PARTIAL,
    stride_dy, stride_dho, stride_h, stride_dx, stride_dr,
    N_ROWS, N_COLS,
    HAS_DH_OUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program p handles rows p, p + P, p + 2P, ... and writes its dg share to DG_PARTIAL[p] (no atomics)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < N_COLS
    g = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    zero64 = pid.to(tl.int64) * 0  # int64 row offsets (rows * stride may pass 2^31); `row` itself is int32
    for row in range(pid, N_ROWS, n_programs):
        row64 = zero64 + row
        h = tl.load(H + row64 * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        h_hat = h * rstd
        gy = dy * g
        c = tl.sum(h_hat * gy, axis=0) / N_COLS
        dh = (gy - h_hat * c) * rstd
        if HAS_DH_OUT:  # the gradient of the returned h = x + r flows straight into both inputs
            dh += tl.load(DH_OUT + row64 * stride_dho + cols, mask=ok, other=0.0).to(tl.float32)
        dh_store = dh.to(DX.dtype.element_ty)
        tl.store(DX + row64 * stride_dx + cols, dh_store, mask=ok)
        if HAS_RESIDUAL:  # d residual == dx; a second store is cheaper than a clone (no re-read)
            tl.store(DR + row64 * stride_dr + cols, dh_store, mask=ok)
        dg += dy * h_hat
    tl.store(DG_PARTIAL + pid.to(tl.int64) * N_COLS + cols, dg, mask=ok)
