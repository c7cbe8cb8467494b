"""Triton kernels of the palette-lookup embedding, imported on first use.

Forward (one kernel): a program takes BLOCK_T consecutive source tokens s of one batch row, finds their ids (loads
them, or quantizes the RGB pixels against all V centres on the fly: a [BLOCK_T, BLOCK_V] distance tile at a time,
never a B*N*V tensor) and writes the output rows o = s + SHIFT:  h[o] = wte[id_s] + wpe[p0 + o]  (SHIFT = 1 for the
autoregressive objective, whose row 0 is sos + wpe[p0] and which drops the last token's id; 0 otherwise). Shifting
the output instead of the input means each pixel is quantized exactly once.

The quantize rule is exact (see reference.quantize_reference): unit = TABLE[x] (a 256-entry fp32 table: no division
on the device), d = ((r - c0)^2 + (g - c1)^2) + (b - c2)^2 with every product and sum rounded on its own. The
backend contracts `a * a + s` into one fma (rounding once, not twice) whenever it may, which flips ties and
near-ties; the squares therefore go through libdevice's `mul_rn` (PTX `mul.rn.f32`, which ptxas never fuses), and
tests/test_norm_embedding_compile.py checks the PTX has no fma. (libdevice emits `mul.rn.ftz`: flushing subnormals
cannot change a result, as |unit| >= 1/255 makes every nonzero difference >= 2^-33 and its square a normal float.)
Ties go to the lowest id: within a tile the first
index of the minimum, across tiles (in increasing id order) only a strictly smaller distance replaces the best.

Backward, deterministic (no float atomics):
  * d wte: the host sorts the output rows by the id they gathered (stable sort; masked and SOS rows sort to a
    sentinel past V and are dropped) and counts rows per id; program (v, column block) owns wte row v and sums its
    segment of the sorted rows in a fixed order.
  * d wpe: program (token block, column block) sums dh over the batch in order; d sos is d wpe[p0] (the same sum).
"""
import torch
import triton
import triton.language as tl

from . import _interpreter_compat
from ._dispatch import INTERPRET, config_table_arch, device_arch

_interpreter_compat.apply()

if INTERPRET:
    @triton.jit
    def _mul_rn(a, b):
        return a * b  # numpy rounds every product on its own; the interpreter has no libdevice
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _mul_rn(a, b):
        return libdevice.mul_rn(a, b)

# ------------------------------------------------------------------------------------------------------------------
# Configurations: (BLOCK_T, BLOCK_V, BLOCK_C, num_warps) for the forward, (BLOCK_R, BLOCK_C, num_warps) for d wte and
# (BLOCK_T, BLOCK_C, num_warps) for d wpe. The forward is bound by the distance search for pixel inputs (V = 512
# centres x 3 channels per token, ~9 flops per distance) and by the wte/wpe row traffic otherwise; BLOCK_T x BLOCK_V
# distances (plus their ids) must stay in registers. Hopper gets 8 warps on the bigger token tile (more bytes in
# flight per SM); Ampere's smaller register budget per resident warp prefers 4 warps with 32 tokens.
# ------------------------------------------------------------------------------------------------------------------
FWD_CONFIGS = {
    80: [(32, 64, 128, 4), (16, 128, 256, 4)],
    90: [(64, 64, 128, 8), (32, 64, 128, 4)],
}
BWD_WTE_CONFIGS = {
    80: [(16, 128, 4), (32, 256, 8)],
    90: [(32, 128, 4), (32, 256, 8)],
}
BWD_WPE_CONFIGS = {
    80: [(8, 128, 4), (16, 256, 8)],
    90: [(16, 128, 4), (16, 256, 8)],
}
# One config under the interpreter (multi-config autotuning needs a GPU to benchmark). Small tiles so the test
# shapes span several token, centre and column tiles.
INTERPRET_CONFIGS = {"fwd": (8, 16, 32, 4), "bwd_wte": (4, 32, 4), "bwd_wpe": (4, 32, 4)}
_META_NAMES = {"fwd": ("BLOCK_T", "BLOCK_V", "BLOCK_C"), "bwd_wte": ("BLOCK_R", "BLOCK_C"),
               "bwd_wpe": ("BLOCK_T", "BLOCK_C")}
CONFIG_TABLES = {"fwd": FWD_CONFIGS, "bwd_wte": BWD_WTE_CONFIGS, "bwd_wpe": BWD_WPE_CONFIGS}


def meta_of(kind, entry):
    """({BLOCK_*: value}, num_warps) of one table entry."""
    return dict(zip(_META_NAMES[kind], entry[:-1])), entry[-1]


def fixed_config(kind, arch):
    """Launch kwargs of deterministic mode: the first entry of CONFIG_TABLES[kind][arch] (arch None:
    INTERPRET_CONFIGS[kind]); a pure function of its arguments, the same in every process and rank."""
    meta, num_warps = meta_of(kind, INTERPRET_CONFIGS[kind] if arch is None else CONFIG_TABLES[kind][arch][0])
    return {**meta, "num_warps": num_warps, "num_stages": 1}


def _autotune(kind, key):
    if INTERPRET or not torch.cuda.is_available():
        entries = [INTERPRET_CONFIGS[kind]]
    else:
        entries = CONFIG_TABLES[kind][config_table_arch(torch.cuda.get_device_capability())]
    configs = [triton.Config(meta, num_warps=w, num_stages=1) for meta, w in (meta_of(kind, e) for e in entries)]
    return triton.autotune(configs=configs, key=key)


# ------------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _channel_distance(unit, CENTRES, offs_v, v_ok, ch: tl.constexpr):
    c = tl.load(CENTRES + offs_v * 3 + ch, mask=v_ok, other=0.0)
    diff = unit[:, None] - c[None, :]
    return _mul_rn(diff, diff)


@triton.jit
def _quantize(X_b, TABLE, CENTRES, offs_s, s_ok, stride_xn, stride_xc, V,
              BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Nearest centre (int32 [BLOCK_T]) of the pixels offs_s of one batch row; ties -> lowest id."""
    px = X_b + offs_s * stride_xn
    r = tl.load(TABLE + tl.load(px, mask=s_ok, other=0).to(tl.int32))
    g = tl.load(TABLE + tl.load(px + stride_xc, mask=s_ok, other=0).to(tl.int32))
    b = tl.load(TABLE + tl.load(px + 2 * stride_xc, mask=s_ok, other=0).to(tl.int32))
    best_d = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
    best_id = tl.zeros([BLOCK_T], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        # Left to right, as the rule says: (dr^2 + dg^2) + db^2.
        d = _channel_distance(r, CENTRES, offs_v, v_ok, 0) + _channel_distance(g, CENTRES, offs_v, v_ok, 1)
        d = d + _channel_distance(b, CENTRES, offs_v, v_ok, 2)
        d = tl.where(v_ok[None, :], d, float("inf"))
        tile_min = tl.min(d, axis=1)
        tile_id = tl.min(tl.where(d == tile_min[:, None], offs_v[None, :], 2147483647), axis=1)
        better = tile_min < best_d  # strict: an equal distance in a later (higher-id) tile loses the tie
        best_id = tl.where(better, tile_id, best_id)
        best_d = tl.where(better, tile_min, best_d)
    return best_id


@triton.jit
def embed_fwd_kernel(
    X, TABLE, CENTRES, IDS_IN, BERT_MASK, WTE, WPE, SOS, H, IDS_OUT,
    stride_xb, stride_xn, stride_xc,
    stride_ib, stride_in,
    stride_mb, stride_mn,
    stride_wte, stride_wpe,
    N, V, C, pos_offset,
    FROM_PIXELS: tl.constexpr, AR: tl.constexpr, BERT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    SHIFT: tl.constexpr = 1 if AR else 0
    offs_s = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    s_ok = offs_s < N
    if FROM_PIXELS:
        ids = _quantize(X + b * stride_xb, TABLE, CENTRES, offs_s, s_ok, stride_xn, stride_xc, V, BLOCK_T, BLOCK_V)
        tl.store(IDS_OUT + b * N + offs_s, ids.to(tl.int64), mask=s_ok)
    else:
        ids = tl.load(IDS_IN + b * stride_ib + offs_s * stride_in, mask=s_ok, other=0)
    offs_o = offs_s + SHIFT
    o_ok = offs_o < N
    take_wte = o_ok
    if BERT:
        masked = tl.load(BERT_MASK + b * stride_mb + offs_o * stride_mn, mask=o_ok, other=0) != 0
        take_wte = take_wte & ~masked
    wte_rows = WTE + ids.to(tl.int64)[:, None] * stride_wte
    wpe_rows = WPE + (pos_offset + offs_o).to(tl.int64)[:, None] * stride_wpe
    h_rows = H + (b * N + offs_o.to(tl.int64))[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        tok = tl.load(wte_rows + offs_c[None, :], mask=take_wte[:, None] & c_ok[None, :], other=0.0)
        pos = tl.load(wpe_rows + offs_c[None, :], mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        h = tok.to(tl.float32) + pos.to(tl.float32)
        tl.store(h_rows + offs_c[None, :], h.to(H.dtype.element_ty), mask=o_ok[:, None] & c_ok[None, :])
    if AR:
        if pid_t == 0:  # row 0 is the start-of-sequence vector
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < C
                sos = tl.load(SOS + offs_c, mask=c_ok, other=0.0).to(tl.float32)
                pos = tl.load(WPE + (b * 0 + pos_offset) * stride_wpe + offs_c, mask=c_ok, other=0.0)
                tl.store(H + b * N * C + offs_c, (sos + pos.to(tl.float32)).to(H.dtype.element_ty), mask=c_ok)


# ------------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def embed_bwd_wte_kernel(
    DH, ORDER, STARTS, COUNTS, DWTE,
    stride_dwte, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """d wte[v] = sum of dh over the output rows that gathered wte[v]: ORDER[STARTS[v] : STARTS[v] + COUNTS[v]]."""
    v = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    start = tl.load(STARTS + v)
    count = tl.load(COUNTS + v)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, count, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < count
        rows = tl.load(ORDER + start + offs_r, mask=r_ok, other=0)
        acc += tl.load(DH + rows[:, None] * C + offs_c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(DWTE + v * stride_dwte + offs_c, tl.sum(acc, axis=0).to(DWTE.dtype.element_ty), mask=c_ok)


@triton.jit
def embed_bwd_wpe_kernel(
    DH, DWPE,
    stride_dwpe, B, N, C, pos_offset,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """d wpe[p0 + t] = sum over the batch of dh[:, t], in batch order."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (offs_t < N)[:, None] & (offs_c < C)[None, :]
    tile = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    batch_stride = (tl.program_id(0).to(tl.int64) * 0 + N) * C  # int64: B * N * C may pass 2^31
    for b in range(0, B):
        acc += tl.load(DH + b * batch_stride + tile, mask=ok, other=0.0).to(tl.float32)
    dst = DWPE + (pos_offset + offs_t).to(tl.int64)[:, None] * stride_dwpe + offs_c[None, :]
    tl.store(dst, acc.to(DWPE.dtype.element_ty), mask=ok)


# Autotuned entry points (the plain JIT kernels above stay importable for ahead-of-time compilation). The tuning keys
# are the shapes and flags that change the best tile; token counts are left out so decode does not re-tune per step.
embed_fwd = _autotune("fwd", ["V", "C", "FROM_PIXELS", "AR", "BERT"])(embed_fwd_kernel)
embed_bwd_wte = _autotune("bwd_wte", ["C"])(embed_bwd_wte_kernel)
embed_bwd_wpe = _autotune("bwd_wpe", ["C"])(embed_bwd_wpe_kernel)


def bwd_wte_launcher(deterministic, device):
    """(kernel, extra launch kwargs) of d wte: the autotuner, or with deterministic=True the plain kernel at
    fixed_config. Only d wte needs this: BLOCK_R splits each id's rows into BLOCK_R partial sums, so its tile sets the
    summation order; the forward sums nothing and d wpe adds the batch rows in order whatever its tile."""
    if not deterministic:
        return embed_bwd_wte, {}
    return embed_bwd_wte_kernel, fixed_config("bwd_wte", device_arch(device))
