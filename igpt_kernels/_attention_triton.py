"""Triton kernels of the fused attention (FlashAttention-2 style), imported on first use.

This module imports triton at the top, so only `igpt_kernels.attention` (on the first Triton launch) and
`igpt_kernels._compile` import it: `import igpt_kernels` keeps working where triton is absent.

Units: scores are kept in base 2. `qk_scale = sm_scale * log2(e)` is folded into the scores so every exponential is an
`exp2`, and the saved log-sum-exp `LSE` is in the same base-2 units (`lse2 = m + log2(l)`), which the backward uses
as `P = exp2(QK^T * qk_scale - lse2)`. A query row with no key to attend gets `lse2 = +inf`, so the backward
recomputes P = 0 there, and the forward writes 0 for it.

Layouts: Q, K, V, O and dO are read and written through their strides (views such as a split qkv projection need no
copy; O is allocated as [B, N, H, D] memory so the output projection reads it without a transpose copy); LSE, delta,
dQ, dK and dV are buffers this package allocates, contiguous [B, H, N, D] (or [B, H, N]), so their offsets are
computed from the shape. Batch/head offsets are int64 so tensors over 2^31 elements index correctly.

Grids are (tiles along the sequence, H, B): CUDA caps grid dims 1 and 2 at 65535, which B*H in one dim could exceed.
"""
import torch
import triton
import triton.language as tl

from . import _interpreter_compat
from ._dispatch import INTERPRET, config_table_arch, device_arch

_interpreter_compat.apply()

# A finite stand-in for -inf as the initial running max: with masked scores at -inf, a -inf running max would give
# exp2(-inf - (-inf)) = NaN for rows (or whole tiles) with nothing to attend; a finite start keeps alpha = 1, p = 0.
_M_INIT = tl.constexpr(-1.0e30)

# ------------------------------------------------------------------------------------------------------------------
# Tile configurations.
#
# Entries are (BLOCK_M, BLOCK_N, num_warps, num_stages) in three groups; the autotuner only benchmarks the group a
# call falls into. "d64"/"d128": fp16/bf16 with the (padded) head dim <= 64 / == 128; the dots run on tensor cores.
# "fp32": every fp32 head dim. fp32 dots at IEEE precision run on FMA units, where triton keeps whole operand slices
# (the full head dim) in registers, so fp32 needs small tiles, 8 warps and often a single stage to avoid spills
# (4-warp 16x16 tiles still spill at D=96/128). Most small fp32 spills are not register shortage: triton emits
# `.reqntid num_warps*32`, and ptxas then spills a few cheap values (thread-index bits) to fit the next occupancy
# tier (64/72/80/96/128 registers); without .reqntid, or with a .maxnreg, the same PTX has no spills. Which
# specialisation trips it is erratic, so the sm_80 fp32 backward entries carry a fifth field, maxnreg (255), and
# every fp32 entry is checked over the full product. Every entry is compiled
# for its target by tests/test_attention_compile.py (shared memory within the device limit, no register spills), and
# `python -m igpt_kernels._compile` prints the table.
#
# Why these shapes: on sm_90 a BLOCK_M of 128 needs 8 warps (two warpgroups; with 4 warps the fp32 accumulator plus
# the score tile reach the 255-register cap), and wgmma wants the M tile >= 64 per 4 warps. Small BLOCK_M entries
# exist for KV-cache decode (Nq = 1..16), where a 128-row tile would be mostly padding. Ampere gets fewer pipeline
# stages: its shared memory is 163 KiB and cp.async pipelining gains less beyond 2-3 stages.
# In dK/dV the roles flip: the program owns BLOCK_N keys (the MMA M dimension) and streams BLOCK_M queries; it holds
# two [BLOCK_N, D] fp32 accumulators, hence the small BLOCK_M there. On sm_80 the fp16/bf16 backward at D = 96/128
# hits the 255-register cap with 4-warp 64-row tiles (and with a 2-stage 128x32 dQ tile), so those entries use 8 warps
# or one stage; D = 96 spills first because its masked loads of the padded head dim need extra registers.
# Every entry must show 0 spills under triton 3.6 (CI) and the newest triton (3.9): 3.9 needs more registers at
# D = 96/128, so sm_80 d128 forward streams 32-key tiles and sm_90 d128 dK/dV 16 queries (fewer stages did not help;
# 16 warps cap a thread at 128 registers and spill more); the sm_90 fp32 dK/dV entry takes maxnreg 255 as on sm_80.
# The strided output store (O as [B, N, H, D] memory) costs the sm_80 d128 forward's 4-warp 128-row tile its last
# registers: that entry is 64 x 32.
# ------------------------------------------------------------------------------------------------------------------
TILE_GROUPS = ("d64", "d128", "fp32")

FWD_CONFIGS = {
    80: {
        "d64": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)],
        "d128": [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (32, 32, 4, 2)],
        "fp32": [(32, 32, 8, 1), (32, 16, 4, 1), (16, 32, 8, 1)],
    },
    90: {
        "d64": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
        "d128": [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 2)],
        "fp32": [(16, 32, 8, 1), (16, 16, 8, 1)],
    },
}
# dK/dV pass: BLOCK_N keys owned by the program, BLOCK_M queries streamed.
BWD_DKDV_CONFIGS = {
    80: {
        "d64": [(32, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 2)],
        "d128": [(16, 128, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
        "fp32": [(16, 64, 8, 1, 255), (16, 32, 8, 1, 255)],
    },
    90: {
        "d64": [(32, 128, 8, 2), (64, 128, 8, 1), (32, 64, 4, 3)],
        "d128": [(16, 128, 8, 2), (16, 64, 8, 2)],
        "fp32": [(16, 32, 8, 1, 255)],
    },
}
# Deterministic dQ pass: BLOCK_M queries owned, BLOCK_N keys streamed.
BWD_DQ_CONFIGS = {
    80: {
        "d64": [(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2)],
        "d128": [(128, 32, 8, 1), (64, 32, 8, 2), (32, 32, 4, 2)],
        "fp32": [(32, 16, 4, 2, 255), (64, 16, 8, 1, 255)],
    },
    90: {
        "d64": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
        "d128": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
        "fp32": [(32, 16, 8, 2)],
    },
}
# The interpreter runs one config (multi-config autotuning needs a GPU driver to benchmark). BLOCK_M != BLOCK_N on
# purpose: it exercises the causal tile bounds where query and key tiles do not line up.
# delta = rowsum(dO * O) is memory bound and runs at one tile: 64 rows spill at D=96 in fp16 (sm_90).
PREPROCESS_BLOCK_M = 32
INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}

CONFIG_TABLES = {"fwd": FWD_CONFIGS, "dkdv": BWD_DKDV_CONFIGS, "dq": BWD_DQ_CONFIGS}


def block_d(head_dim):
    """Head dims are padded to a power of two >= 16 inside the kernel (tl.dot needs dims >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def tile_group(head_dim, element_size):
    """Which config group serves a call: see the tile configuration notes above."""
    if element_size == 4:
        return "fp32"
    return "d64" if block_d(head_dim) <= 64 else "d128"


def unpack_entry(entry):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) -> five values, maxnreg None when not given."""
    block_m, block_n, num_warps, num_stages, *maxnreg = entry
    return block_m, block_n, num_warps, num_stages, (maxnreg[0] if maxnreg else None)


def to_triton_config(entry):
    block_m, block_n, num_warps, num_stages, maxnreg = unpack_entry(entry)
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
                         maxnreg=maxnreg)


def _autotune_configs(kind):
    """(configs, prune) for the autotuner of one kernel, for the device this process will launch on."""
    if INTERPRET or not torch.cuda.is_available():
        return [to_triton_config(INTERPRET_CONFIGS[kind])], None
    arch = config_table_arch(torch.cuda.get_device_capability())
    table = CONFIG_TABLES[kind][arch]
    by_group = {group: [to_triton_config(e) for e in entries] for group, entries in table.items()}
    configs = [c for entries in by_group.values() for c in entries]

    def prune(configs, named_args, **kwargs):
        group = by_group[tile_group(kwargs["HEAD_DIM"], named_args["Q"].element_size())]
        kept = [c for c in configs if any(c is g for g in group)]
        return fit_query_tiles(kept, named_args["TUNE_N_Q"]) if kind in ("fwd", "dq") else kept

    return configs, {"early_config_prune": prune}


def fit_query_tiles(configs, tune_n_q):
    """The configs whose query tile (BLOCK_M) is no taller than the queries' power-of-two bucket: a 128-row tile for 20
    queries is mostly padding, and timing it is wasted tuning. Keeps the shortest tiles when none fits."""
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, tune_n_q)]
    shortest = min(c.kwargs["BLOCK_M"] for c in configs)
    return fitting or [c for c in configs if c.kwargs["BLOCK_M"] == shortest]


def _autotune(kind, key, reset_to_zero=None):
    configs, prune = _autotune_configs(kind)
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune, reset_to_zero=reset_to_zero)


def fixed_config(kind, arch, head_dim, element_size):
    """Launch parameters of deterministic mode: the first entry of the call's group, CONFIG_TABLES[kind][arch][group]
    (arch None: INTERPRET_CONFIGS[kind]), as kwargs of a plain `kernel[grid](...)` launch.

    A pure function of (kind, arch, head dim, element size): no timing, call history or sequence length enters, so a
    restarted process or another rank launches the same tiles and so sums in the same order.
    """
    if arch is None:
        entry = INTERPRET_CONFIGS[kind]
    else:
        entry = CONFIG_TABLES[kind][arch][tile_group(head_dim, element_size)][0]
    block_m, block_n, num_warps, num_stages, maxnreg = unpack_entry(entry)
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:  # triton >= 3.4 takes maxnreg as a launch option; omitted, ptxas picks
        config["maxnreg"] = maxnreg
    return config


# ------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # Interior tiles load without predicates; only tails (sequence end, padded head dim) pay for the mask.
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, x, row_ok, col_ok, CHECK_COLS: tl.constexpr):
    if CHECK_COLS:
        tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def _query_tile_key_bounds(start_m, N_K, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           CAUSAL: tl.constexpr):
    """Key range of a query tile: [0, n_full) needs no bounds/causal masking, [n_full, n_end) does.

    Query i sees keys j <= i + causal_offset (bottom-right alignment, causal_offset = Nk - Nq). Key tiles right of
    the last row's horizon are skipped entirely; tiles left of the first row's horizon are fully visible.
    """
    n_full = (N_K // BLOCK_N) * BLOCK_N
    n_end = N_K
    if CAUSAL:
        n_full = tl.minimum(n_full, ((start_m + causal_offset + 1) // BLOCK_N) * BLOCK_N)
        n_end = tl.minimum(N_K, start_m + BLOCK_M + causal_offset)
    return n_full, n_end


# ------------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K, causal_offset,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
              PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              MASKED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_K
    k = _load_tile(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok, MASKED, PAD_D)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    if MASKED:
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        qk = tl.where(visible, qk, float("-inf"))
    if HAS_MASK:
        key_ok = tl.load(KM_b + offs_n * stride_mn, mask=n_ok, other=0) != 0
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok, MASKED, PAD_D)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def attn_fwd_kernel(
    Q, K, V, KEY_MASK, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    N_HEADS, N_Q, N_K, qk_scale,
    TUNE_N_Q, TUNE_N_K,  # power-of-two buckets of N_Q/N_K: autotune cache key only (decode grows N_K every step)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * N_HEADS + h
    Q_bh = Q + b * stride_qb + h * stride_qh
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    KM_b = KEY_MASK + b * stride_mb

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    causal_offset = N_K - N_Q

    q = _load_tile(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, m_ok, d_ok, True, PAD_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)

    n_full, n_end = _query_tile_key_bounds(start_m, N_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K,
                                  causal_offset, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                                  PAD_D, BLOCK_N, CAUSAL, HAS_MASK, False)
    for start_n in range(n_full, n_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K,
                                  causal_offset, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                                  PAD_D, BLOCK_N, CAUSAL, HAS_MASK, True)

    empty = l_i == 0.0  # no key to attend: output 0, and lse = +inf makes the backward's P exactly 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))

    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    _store_tile(o_ptrs, acc.to(O.dtype.element_ty), m_ok, d_ok, PAD_D)
    tl.store(LSE + pid_bh * N_Q + offs_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    N_HEADS, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax-Jacobian term shared by the dK/dV and dQ passes."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * N_HEADS + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * N_Q + offs_m, delta, mask=m_ok)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, key_ok, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQ_bh, start_m, offs_n, offs_d, d_ok,
                   N_Q, causal_offset, stride_qm, stride_qd, stride_dom, stride_dod, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, MASKED: tl.constexpr):
    # Transposed formulation: the program's keys are the rows (the MMA M dimension), streamed queries the columns.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    q_t = _load_tile(Q_bh + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm, d_ok, m_ok, PAD_D, MASKED)
    if MASKED:
        lse = tl.load(LSE_bh + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA_bh + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(LSE_bh + offs_m)
        delta = tl.load(DELTA_bh + offs_m)
    qk_t = tl.dot(k, q_t, input_precision="ieee")
    p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
    # Masked entries are selected to 0, never multiplied: exp2 may overflow to inf where the mask hides a key.
    if MASKED:
        # key_ok (keys < N_K, and the key mask if any): keys past N_K load as 0, so p = exp2(-lse) = inf for lse < -128.
        visible = key_ok[:, None] & m_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
        p_t = tl.where(visible, p_t, 0.0)
    elif HAS_MASK:
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
    do = _load_tile(DO_bh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, m_ok, d_ok, MASKED, PAD_D)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
    dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
    dk = tl.dot(ds_t, tl.trans(q_t), dk, input_precision="ieee")
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t), k, input_precision="ieee") * sm_scale
        dq_ptrs = DQ_bh + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        if MASKED:
            tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
        elif PAD_D:
            tl.atomic_add(dq_ptrs, dq, mask=d_ok[None, :], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, KEY_MASK, DO, LSE, DELTA, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    N_HEADS, N_Q, N_K, sm_scale, qk_scale,
    TUNE_N_Q, TUNE_N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # True: also accumulate dQ (fp32) with atomics; False: attn_bwd_dq_kernel does it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * N_HEADS + h
    Q_bh = Q + b * stride_qb + h * stride_qh
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    DO_bh = DO + b * stride_dob + h * stride_doh
    LSE_bh = LSE + pid_bh * N_Q
    DELTA_bh = DELTA + pid_bh * N_Q
    DQ_bh = DQ_ACC + pid_bh * N_Q * HEAD_DIM

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_DIM
    causal_offset = N_K - N_Q

    k = _load_tile(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok, True, PAD_D)
    v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok, True, PAD_D)
    if HAS_MASK:
        key_ok = tl.load(KEY_MASK + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0
    else:
        key_ok = n_ok
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query tiles: [m_lo, m_full) cross the causal diagonal (masked), [m_full, m_mid) see every key of this tile
    # (unmasked), [m_mid, m_end) is the ragged query tail (masked). Tiles above the diagonal are skipped. When this
    # key tile is itself ragged (past N_K) every query tile goes through the masked path.
    m_end = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        m_lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(m_full, m_end)
        m_lo = tl.minimum(m_lo, m_full)
    else:
        m_lo = 0
        m_full = 0
    key_tile_ragged = start_n + BLOCK_N > N_K
    m_mid = tl.where(key_tile_ragged, m_full, tl.maximum(m_full, (N_Q // BLOCK_M) * BLOCK_M))

    for start_m in range(m_lo, m_full, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, key_ok, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQ_bh, start_m, offs_n, offs_d,
                                d_ok, N_Q, causal_offset, stride_qm, stride_qd, stride_dom, stride_dod, sm_scale,
                                qk_scale, HEAD_DIM, PAD_D, BLOCK_M, CAUSAL, HAS_MASK, ATOMIC_DQ, True)
    for start_m in range(m_full, m_mid, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, key_ok, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQ_bh, start_m, offs_n, offs_d,
                                d_ok, N_Q, causal_offset, stride_qm, stride_qd, stride_dom, stride_dod, sm_scale,
                                qk_scale, HEAD_DIM, PAD_D, BLOCK_M, CAUSAL, HAS_MASK, ATOMIC_DQ, False)
    for start_m in range(m_mid, m_end, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, key_ok, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQ_bh, start_m, offs_n, offs_d,
                                d_ok, N_Q, causal_offset, stride_qm, stride_qd, stride_dom, stride_dod, sm_scale,
                                qk_scale, HEAD_DIM, PAD_D, BLOCK_M, CAUSAL, HAS_MASK, ATOMIC_DQ, True)

    kv_offs = pid_bh * N_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    _store_tile(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), n_ok, d_ok, PAD_D)
    _store_tile(DV + kv_offs, dv.to(DV.dtype.element_ty), n_ok, d_ok, PAD_D)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K, causal_offset,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                 PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 MASKED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_K
    k = _load_tile(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok, MASKED, PAD_D)
    v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok, MASKED, PAD_D)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(visible, p, 0.0)
    if HAS_MASK:
        key_ok = tl.load(KM_b + offs_n * stride_mn, mask=n_ok, other=0) != 0
        p = tl.where(key_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    return tl.dot(ds, k, dq, input_precision="ieee")


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, KEY_MASK, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    N_HEADS, N_Q, N_K, sm_scale, qk_scale,
    TUNE_N_Q, TUNE_N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Deterministic dQ: one program owns a query tile and sums over key tiles in a fixed order (no atomics)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * N_HEADS + h
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    KM_b = KEY_MASK + b * stride_mb

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    causal_offset = N_K - N_Q

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   m_ok, d_ok, True, PAD_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    m_ok, d_ok, True, PAD_D)
    lse = tl.load(LSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full, n_end = _query_tile_key_bounds(start_m, N_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, n_full, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K, causal_offset,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                          PAD_D, BLOCK_N, CAUSAL, HAS_MASK, False)
    for start_n in range(n_full, n_end, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, KM_b, start_n, offs_m, offs_d, d_ok, N_K, causal_offset,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                          PAD_D, BLOCK_N, CAUSAL, HAS_MASK, True)

    dq_offs = pid_bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    _store_tile(DQ + dq_offs, (dq * sm_scale).to(DQ.dtype.element_ty), m_ok, d_ok, PAD_D)


# Autotuned entry points (the plain JIT kernels above stay importable for ahead-of-time compilation).
_TUNE_KEY = ["TUNE_N_Q", "TUNE_N_K", "HEAD_DIM", "CAUSAL", "HAS_MASK"]
attn_fwd = _autotune("fwd", _TUNE_KEY)(attn_fwd_kernel)
# Benchmarking re-runs the kernel, so the atomically accumulated dQ buffer must be zeroed between trials.
attn_bwd_dkdv = _autotune("dkdv", _TUNE_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ_ACC"])(attn_bwd_dkdv_kernel)
attn_bwd_dq = _autotune("dq", _TUNE_KEY)(attn_bwd_dq_kernel)

_KERNELS = {"fwd": (attn_fwd, attn_fwd_kernel), "dkdv": (attn_bwd_dkdv, attn_bwd_dkdv_kernel),
            "dq": (attn_bwd_dq, attn_bwd_dq_kernel)}


def launcher(kind, deterministic, device, head_dim, element_size):
    """(kernel, extra launch kwargs) for `kernel[grid](*args, **kwargs, **extra)`: the autotuner by default; with
    deterministic=True the plain kernel at fixed_config, so no config is ever chosen by timing."""
    autotuned, plain = _KERNELS[kind]
    if not deterministic:
        return autotuned, {}
    return plain, fixed_config(kind, device_arch(device), head_dim, element_size)
