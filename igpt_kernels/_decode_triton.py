"""Split-KV attention forward for decode (Nq <= 16 queries per head, flash-decoding style), imported on first use.

Stage 1 (`attn_decode_split_kernel`, grid (splits, H, B)): each program takes one key split of one (b, h), all Nq
queries of that head in one BLOCK_M = 16 tile (tl.dot needs >= 16 rows; padded rows are never stored), streams the
split's keys in BLOCK_N tiles with the online softmax of the main kernel, and writes its unnormalised partial
accumulator, running max and running sum (fp32, base-2 units) to scratch. Stage 2 (`attn_decode_combine_kernel`,
grid (H, B)) merges the splits in a fixed order (split 0, 1, ...: bit-reproducible) and writes the output through its
strides and the log-sum-exp (base 2, +inf for a row with no visible key, as `_attention_triton.attn_fwd_kernel`).

No autotuning: one config per (arch, dtype group, head dim) from `decode_config`, and the split count from
`split_plan`, both pure functions of the shapes, so a decode step launches no benchmark and reads nothing back from
the device (CUDA graphs can capture it).
"""
import torch
import triton
import triton.language as tl

from . import _interpreter_compat
from ._attention_triton import _M_INIT, _fwd_tile, _load_tile, _store_tile, block_d
from ._dispatch import device_arch

_interpreter_compat.apply()

BLOCK_M = 16  # every query of a head (Nq <= 16) in one tile: the smallest M tl.dot accepts
MAX_QUERIES = BLOCK_M
# Programs per SM to aim for: a few waves hide the tail of the last one (splits differ in length by a tile at most).
WAVES = 4
# Under the interpreter there is no SM count: 3 splits per head (odd, so splits and tiles rarely line up).
INTERPRET_SPLITS = 3
COMBINE_WARPS = 4

# (BLOCK_N, num_warps, num_stages) per target and dtype group, then by padded head dim. Decode reads the KV cache
# once and is memory bound: the tiles are as long as registers allow without spills (checked by
# tests/test_attention_decode_compile.py), 2-3 stages keep loads in flight. fp32 dots at IEEE precision run on FMA
# units with the whole head dim in registers, hence shorter key tiles there. A 16-row tile is below wgmma's 64 rows,
# so sm_90 uses mma.sync as sm_80 does. On sm_80 the padded head dim 128 (D = 96, 128) spilled 8-12 bytes with 4
# warps at 128 registers (ptxas fitting an occupancy tier, see _attention_triton.py); 8 warps need 60-80, no spills.
DECODE_CONFIGS = {
    80: {
        "half": {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (64, 8, 2)},
        "fp32": {16: (32, 4, 2), 32: (32, 4, 2), 64: (32, 4, 2), 128: (16, 8, 2)},
    },
    90: {
        "half": {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (64, 4, 3)},
        "fp32": {16: (32, 4, 2), 32: (32, 4, 2), 64: (32, 4, 2), 128: (16, 4, 2)},
    },
}
INTERPRET_CONFIG = (16, 4, 1)  # short key tiles: small test shapes still span several tiles per split


def dtype_group(element_size):
    return "fp32" if element_size == 4 else "half"


def decode_config(arch, element_size, head_dim):
    """(BLOCK_N, num_warps, num_stages) of the split kernel on target `arch` (80 or 90) for one dtype and head dim."""
    return DECODE_CONFIGS[arch][dtype_group(element_size)][block_d(head_dim)]


def split_plan(batch_heads, n_k, block_n, target_programs):
    """(splits, keys per split) for `batch_heads` heads of `n_k` keys: enough (b, h, split) programs to reach
    `target_programs`, each split a whole number (>= 1) of BLOCK_N tiles, none empty (only the last is ragged)."""
    tiles = triton.cdiv(n_k, block_n)
    wanted = min(tiles, max(1, triton.cdiv(target_programs, batch_heads)))
    keys_per_split = triton.cdiv(tiles, wanted) * block_n
    return triton.cdiv(n_k, keys_per_split), keys_per_split


_sm_counts = {}


def sm_count(device):
    """Streaming multiprocessors of a CUDA device, queried once per device."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def launch_plan(q, n_k):
    """((BLOCK_N, num_warps, num_stages), splits, keys per split) for a decode call on q's device."""
    b, h, _, d = q.shape
    arch = device_arch(q.device)
    if arch is None:
        config = INTERPRET_CONFIG
        target = INTERPRET_SPLITS * b * h
    else:
        config = decode_config(arch, q.element_size(), d)
        target = WAVES * sm_count(q.device)
    return (config, *split_plan(b * h, n_k, config[0], target))


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def attn_decode_split_kernel(
    Q, K, V, KEY_MASK, ACC, M, L,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    N_HEADS, N_Q, N_K, KEYS_PER_SPLIT, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    split = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n_splits = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    causal_offset = N_K - N_Q

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   m_ok, d_ok, True, PAD_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)

    # Keys [lo, hi) of this split; [lo, n_full) needs no masking: in range, and visible to every query (key j is
    # visible to query 0 when j <= causal_offset). Split bounds are multiples of BLOCK_N, so tiles stay aligned.
    lo = split * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, N_K)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    if CAUSAL:
        n_full = tl.minimum(n_full, ((causal_offset + 1) // BLOCK_N) * BLOCK_N)
    n_full = tl.maximum(tl.minimum(n_full, hi), lo)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    KM_b = KEY_MASK + b * stride_mb
    for start_n in range(lo, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K,
                                  causal_offset, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                                  PAD_D, BLOCK_N, CAUSAL, HAS_MASK, False)
    for start_n in range(n_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K,
                                  causal_offset, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                                  PAD_D, BLOCK_N, CAUSAL, HAS_MASK, True)

    row = ((b * N_HEADS + h) * n_splits + split) * N_Q + offs_m  # scratch [B, H, splits, Nq(, D)], contiguous
    _store_tile(ACC + row[:, None] * HEAD_DIM + offs_d[None, :], acc, m_ok, d_ok, PAD_D)
    tl.store(M + row, m_i, mask=m_ok)
    tl.store(L + row, l_i, mask=m_ok)


@triton.jit(do_not_specialize=["N_Q", "N_SPLITS"])
def attn_decode_combine_kernel(
    ACC, M, L, O, LSE,
    stride_ob, stride_oh, stride_om, stride_od,
    N_HEADS, N_Q, N_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pid_bh = b * N_HEADS + h
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    for split in range(0, N_SPLITS):  # fixed order: the result does not depend on which split finished first
        row = (pid_bh * N_SPLITS + split) * N_Q + offs_m
        m_s = tl.load(M + row, mask=m_ok, other=_M_INIT)
        l_s = tl.load(L + row, mask=m_ok, other=0.0)
        acc_s = _load_tile(ACC + row[:, None] * HEAD_DIM + offs_d[None, :], m_ok, d_ok, True, PAD_D)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.math.exp2(m_i - m_new)
        beta = tl.math.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new

    empty = l_i == 0.0  # no visible key in any split: output 0, lse = +inf (as the main forward)
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    _store_tile(o_ptrs, acc.to(O.dtype.element_ty), m_ok, d_ok, PAD_D)
    tl.store(LSE + pid_bh * N_Q + offs_m, lse, mask=m_ok)
