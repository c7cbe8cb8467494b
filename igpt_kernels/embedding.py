"""Fused palette-lookup embedding: RGB pixels or token ids -> nearest palette centre -> wte[id] + wpe[pos].

    palette_embedding(x, wte, wpe, *, centres=None, sos=None, bert_mask=None, pos_offset=0, check_range=True)
        -> (h, ids)

Contract (docs/DESIGN.md): x is uint8 RGB [B,N,3] (quantized against `centres` [V,3] fp32 in [-1,1], V = wte rows) or
int64 ids [B,N] (then `centres` is not used); ids = the (unshifted) token ids, int64 [B,N]. With p0 = pos_offset:
  AR   (sos [C] given):                  h[:,0] = sos + wpe[p0];  h[:,t] = wte[ids[:,t-1]] + wpe[p0+t]
  BERT (bert_mask [B,N] bool, True = masked): h[:,t] = (0 if masked else wte[ids[:,t]]) + wpe[p0+t]
  neither (decode steps):                h[:,t] = wte[ids[:,t]] + wpe[p0+t]
h has wte's dtype (fp16, bf16 or fp32; wpe and sos must match it). Gradients flow to wte, wpe and sos.
Quantize rule: argmin_j ((r-c_j0)^2 + (g-c_j1)^2) + (b-c_j2)^2 in fp32, (r,g,b) = fl(fl(x/127.5)-1), each
operation rounded on its own (no fma), ties -> lowest j: exactly reference.quantize_reference (and igpt's Palette).

Dispatch: CUDA tensors run the Triton kernels (in _embedding_triton.py, imported on first use); CPU tensors run the
torch reference, except under TRITON_INTERPRET=1. `launch_counts` counts launches ("embed_fwd", "embed_bwd_wte",
"embed_bwd_wpe"). The fused forward never builds the [B, N, V] distance tensor; the backward has no float atomics.
Under torch.use_deterministic_algorithms(True) (the trainer's --deterministic; the op has no flag of its own, and the
same switch drives the model's attention) d wte launches one fixed tile config instead of the autotuner's timed pick,
so it is also bit-reproducible across restarts and ranks; otherwise it keeps the tuned speed.
The Triton path is the custom ops torch.ops.igpt.palette_embedding_fwd / _bwd (_custom_ops.py), opaque to
torch.compile.
"""
from __future__ import annotations

import collections

import torch

from ._custom_ops import custom_op
from ._dispatch import TritonDispatch, cdiv
from .reference import palette_embedding_reference, pixel_to_unit_table

__all__ = ["palette_embedding", "launch_counts", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Centres may exceed [-1, 1] by this much (rounding in palettes written by other tools), as igpt.palette accepts.
_RANGE_TOL = 1e-6

launch_counts: collections.Counter = collections.Counter()

_dispatch = TritonDispatch("palette_embedding", "igpt_kernels._embedding_triton")
_kernels = _dispatch.kernels
_use_triton = _dispatch.use_triton
_tables: dict = {}


def _pixel_table(device):
    # The exact pixel -> [-1, 1] table, computed on the CPU once and cached per device.
    if device not in _tables:
        _tables[device] = pixel_to_unit_table(device)
    return _tables[device]


# ------------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------------
def _check_tensor(name, t, *, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"palette_embedding: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_inputs(x, wte, wpe, centres, sos, bert_mask, pos_offset, check_range=True):
    _check_tensor("x", x)
    _check_tensor("wte", wte)
    _check_tensor("wpe", wpe)
    for name, t in (("centres", centres), ("sos", sos), ("bert_mask", bert_mask)):
        _check_tensor(name, t, optional=True)

    # dtypes -> TypeError
    if x.dtype not in (torch.uint8, torch.int64):
        raise TypeError(f"palette_embedding: x must be uint8 RGB pixels [B, N, 3] or int64 token ids [B, N], got "
                        f"dtype {x.dtype}; convert pixels with .round().clamp(0, 255).to(torch.uint8) or ids "
                        f"with .long().")
    if wte.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"palette_embedding: wte has dtype {wte.dtype}; supported are float16, bfloat16 and "
                        f"float32 (igpt_kernels.palette_embedding_reference accepts float64).")
    for name, t in (("wpe", wpe), ("sos", sos)):
        if t is not None and t.dtype != wte.dtype:
            raise TypeError(f"palette_embedding: {name} has dtype {t.dtype} but wte has {wte.dtype}; the output "
                            f"has wte's dtype, so cast {name} to it.")
    if x.dtype == torch.uint8:
        if centres is None:
            raise ValueError("palette_embedding: uint8 pixels need the palette: pass centres=[V, 3] fp32 in "
                             "[-1, 1] (e.g. Palette.centres), or pass int64 token ids instead of pixels.")
        if centres.dtype != torch.float32:
            raise TypeError(f"palette_embedding: centres must be float32 (the quantize rule is defined in fp32), "
                            f"got {centres.dtype}; convert with centres.float().")
    if bert_mask is not None and bert_mask.dtype != torch.bool:
        raise TypeError(f"palette_embedding: bert_mask must have dtype torch.bool (True = masked), got "
                        f"{bert_mask.dtype}; convert with bert_mask.bool().")
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, int):
        raise TypeError(f"palette_embedding: pos_offset must be a Python int, got {type(pos_offset).__name__}; "
                        f"use int(pos_offset).")

    # shapes, values -> ValueError
    if sos is not None and bert_mask is not None:
        raise ValueError("palette_embedding: sos (autoregressive) and bert_mask (BERT) were both given; pass "
                         "sos for the AR objective or bert_mask for BERT, not both.")
    if wte.dim() != 2 or wpe.dim() != 2 or wte.shape[1] != wpe.shape[1]:
        raise ValueError(f"palette_embedding: wte must be [V, C] and wpe [n_positions, C] with the same C, got "
                         f"wte {tuple(wte.shape)} and wpe {tuple(wpe.shape)}.")
    n_vocab, n_embd = wte.shape
    if x.dtype == torch.uint8:
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"palette_embedding: pixels must have shape [B, N, 3], got {tuple(x.shape)}; flatten "
                             f"images with x.reshape(B, H * W, 3).")
        if centres.dim() != 2 or tuple(centres.shape) != (n_vocab, 3):
            raise ValueError(f"palette_embedding: centres must have shape [V, 3] = [{n_vocab}, 3] (one centre per "
                             f"wte row), got {tuple(centres.shape)}.")
    elif x.dim() != 2:
        raise ValueError(f"palette_embedding: ids must have shape [B, N], got {tuple(x.shape)}.")
    b, n = x.shape[0], x.shape[1]
    if sos is not None and tuple(sos.shape) != (n_embd,):
        raise ValueError(f"palette_embedding: sos must have shape [C] = [{n_embd}], got {tuple(sos.shape)}.")
    if bert_mask is not None and tuple(bert_mask.shape) != (b, n):
        raise ValueError(f"palette_embedding: bert_mask must have shape [B, N] = [{b}, {n}], got "
                         f"{tuple(bert_mask.shape)}.")
    if pos_offset < 0 or pos_offset + n > wpe.shape[0]:
        raise ValueError(f"palette_embedding: positions pos_offset .. pos_offset + N - 1 = {pos_offset} .. "
                         f"{pos_offset + n - 1} must lie in 0 .. n_positions - 1 = {wpe.shape[0] - 1}; shorten the "
                         f"sequence or lower pos_offset.")
    tensors = [t for t in (x, wte, wpe, centres if x.dtype == torch.uint8 else None, sos, bert_mask)
               if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"palette_embedding: all tensors must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}; move them with .to(device).")
    # Data-dependent checks (one host sync each): out-of-range ids would read outside wte. torch.compile cannot trace a
    # host sync into a graph, so compiled callers validate their inputs before the compiled region (igpt does).
    if not check_range or torch.compiler.is_compiling():
        return
    if x.dtype == torch.uint8:
        if not bool(torch.isfinite(centres).all()):
            raise ValueError("palette_embedding: centres contain NaN or inf; expected finite values in [-1, 1].")
        worst = centres.abs().max().item() if centres.numel() else 0.0
        if worst > 1.0 + _RANGE_TOL:
            raise ValueError(f"palette_embedding: centres must lie in [-1, 1] (RGB / 127.5 - 1), found |c| = "
                             f"{worst:.4g}; if they are 0..255 colours, pass colours / 127.5 - 1.")
    elif x.numel():
        lo, hi = torch.aminmax(x)
        if lo.item() < 0 or hi.item() >= n_vocab:
            raise ValueError(f"palette_embedding: ids must lie in 0 .. V - 1 = {n_vocab - 1}, found "
                             f"{lo.item()} .. {hi.item()}; the vocabulary is wte's rows (an SOS token is not an "
                             f"id here: pass sos=).")


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _forward(x, wte, wpe, centres, sos, bert_mask, pos_offset):
    tk = _kernels()
    from_pixels = x.dtype == torch.uint8
    b, n = x.shape[0], x.shape[1]
    n_vocab, n_embd = wte.shape
    h = torch.empty((b, n, n_embd), dtype=wte.dtype, device=wte.device)
    if from_pixels:
        ids = torch.empty((b, n), dtype=torch.int64, device=x.device)
        pixels, ids_in, centres = x, ids, centres.contiguous()
        sx, si = x.stride(), (0, 0)
    else:
        ids = x
        pixels, ids_in = x, x  # pixels never read (FROM_PIXELS=False)
        sx, si = (0, 0, 0), x.stride()
        centres = wte  # never read; a real tensor keeps the pointer type fixed
    mask = bert_mask.view(torch.uint8) if bert_mask is not None else ids
    sm = bert_mask.stride() if bert_mask is not None else (0, 0)

    def grid(meta):
        return (cdiv(n, meta["BLOCK_T"]), b)

    tk.embed_fwd[grid](
        pixels, _pixel_table(x.device), centres, ids_in, mask, wte, wpe, sos if sos is not None else wpe, h, ids,
        *sx, *si, *sm, wte.stride(0), wpe.stride(0),
        n, n_vocab, n_embd, pos_offset,
        FROM_PIXELS=from_pixels, AR=sos is not None, BERT=bert_mask is not None,
    )
    launch_counts["embed_fwd"] += 1
    return h, ids


def _gathered_ids(ids, n_vocab, ar, bert_mask):
    """The wte row each output row gathered, flat [B*N]; n_vocab (a sentinel) where it gathered none."""
    if ar:
        sentinel = torch.full_like(ids[:, :1], n_vocab)
        return torch.cat([sentinel, ids[:, :-1]], dim=1).reshape(-1)
    if bert_mask is not None:
        return ids.masked_fill(bert_mask, n_vocab).reshape(-1)
    return ids.reshape(-1)


def _backward(dh, ids, bert_mask, ar, wte_shape, wpe_shape, dtype, pos_offset, need_wte, need_wpe):
    tk = _kernels()
    dh = dh.contiguous()
    b, n, n_embd = dh.shape
    n_vocab = wte_shape[0]
    dwte = dwpe = None
    if need_wte:
        gathered = _gathered_ids(ids, n_vocab, ar, bert_mask)
        # Stable sort: rows of one id keep their (b, t) order, so each segment sum has one fixed order.
        sorted_ids, order = torch.sort(gathered, stable=True)
        bounds = torch.searchsorted(sorted_ids, torch.arange(n_vocab + 1, device=dh.device))
        starts, counts = bounds[:-1].contiguous(), (bounds[1:] - bounds[:-1]).contiguous()
        dwte = torch.empty(wte_shape, dtype=dtype, device=dh.device)
        kernel, fixed = tk.bwd_wte_launcher(torch.are_deterministic_algorithms_enabled(), dh.device)
        kernel[lambda meta: (n_vocab, cdiv(n_embd, meta["BLOCK_C"]))](
            dh, order, starts, counts, dwte, dwte.stride(0), n_embd, **fixed,
        )
        launch_counts["embed_bwd_wte"] += 1
    if need_wpe:
        dwpe = torch.zeros(wpe_shape, dtype=dtype, device=dh.device)  # positions outside the window get 0
        tk.embed_bwd_wpe[lambda meta: (cdiv(n, meta["BLOCK_T"]), cdiv(n_embd, meta["BLOCK_C"]))](
            dh, dwpe, dwpe.stride(0), b, n, n_embd, pos_offset,
        )
        launch_counts["embed_bwd_wpe"] += 1
    return dwte, dwpe


# ------------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton path is opaque to torch.compile (the fake implementations give it the output shapes). The
# entry point validates before calling them. Custom ops return no None, so a gradient not asked for is empty.
# ------------------------------------------------------------------------------------------------------------------
def _palette_embedding_fwd(x: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, centres: torch.Tensor | None,
                           sos: torch.Tensor | None, bert_mask: torch.Tensor | None,
                           pos_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (h [B,N,C] in wte's dtype, ids [B,N] int64). Inputs must be valid."""
    h, ids = _forward(x, wte, wpe, centres, sos, bert_mask, pos_offset)
    if ids is x:  # an op's output may not alias its input; a contiguous copy, as the fake implementation says
        ids = x.clone(memory_format=torch.contiguous_format)
    return h, ids


def _palette_embedding_fwd_fake(x, wte, wpe, centres, sos, bert_mask, pos_offset):
    b, n = x.shape[0], x.shape[1]
    return wte.new_empty((b, n, wte.shape[1])), x.new_empty((b, n), dtype=torch.int64)


def _palette_embedding_bwd(dh: torch.Tensor, ids: torch.Tensor, bert_mask: torch.Tensor | None, ar: bool,
                           n_vocab: int, n_positions: int, pos_offset: int, need_wte: bool,
                           need_wpe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: (dwte [V,C], dwpe [n_positions,C]) in dh's dtype; one not asked for is empty."""
    n_embd = dh.shape[-1]
    dwte, dwpe = _backward(dh, ids, bert_mask, ar, (n_vocab, n_embd), (n_positions, n_embd), dh.dtype, pos_offset,
                           need_wte, need_wpe)
    empty = dh.new_empty(0)
    return (dwte if need_wte else empty), (dwpe if need_wpe else empty.clone())


def _palette_embedding_bwd_fake(dh, ids, bert_mask, ar, n_vocab, n_positions, pos_offset, need_wte, need_wpe):
    n_embd = dh.shape[-1]
    return (dh.new_empty((n_vocab, n_embd) if need_wte else 0), dh.new_empty((n_positions, n_embd) if need_wpe else 0))


def _setup_context(ctx, inputs, output):
    _x, wte, wpe, _centres, sos, bert_mask, pos_offset = inputs
    _, ids = output
    ctx.save_for_backward(ids, bert_mask)
    ctx.ar = sos is not None
    ctx.pos_offset = pos_offset
    ctx.n_vocab, ctx.n_positions = wte.shape[0], wpe.shape[0]


def _backward_formula(ctx, dh, _dids):
    ids, bert_mask = ctx.saved_tensors
    need_wte, need_wpe, need_sos = ctx.needs_input_grad[1:3] + ctx.needs_input_grad[4:5]
    dwte, dwpe = palette_embedding_bwd(dh, ids, bert_mask, ctx.ar, ctx.n_vocab, ctx.n_positions, ctx.pos_offset,
                                       need_wte, need_wpe or need_sos)
    # sos feeds only h[:, 0], as wpe[p0] does: its gradient is the same batch sum.
    dsos = dwpe[ctx.pos_offset].clone() if need_sos else None
    return None, (dwte if need_wte else None), (dwpe if need_wpe else None), None, dsos, None, None


palette_embedding_bwd = custom_op("palette_embedding_bwd", _palette_embedding_bwd, fake=_palette_embedding_bwd_fake)
palette_embedding_fwd = custom_op("palette_embedding_fwd", _palette_embedding_fwd, fake=_palette_embedding_fwd_fake,
                                  backward=_backward_formula, setup_context=_setup_context)


def palette_embedding(x, wte, wpe, *, centres=None, sos=None, bert_mask=None, pos_offset=0, check_range=True):
    """Palette-lookup embedding; see the module docstring for the full contract. Returns (h, ids).

    check_range=False skips the data-dependent checks (ids in 0 .. V-1, centres finite in [-1, 1]), each a host sync
    with the device: for callers that validated these inputs already, e.g. sampling's per-token steps, whose drawn
    ids are in range by construction. Out-of-range ids then read outside wte.
    Raises TypeError for a wrong dtype/type and ValueError for a wrong shape, device, range or value.
    """
    if not isinstance(check_range, bool):
        raise TypeError(f"palette_embedding: check_range must be True or False, got {check_range!r}")
    _check_inputs(x, wte, wpe, centres, sos, bert_mask, pos_offset, check_range)
    if x.numel() == 0 or not _use_triton(wte.device):
        return palette_embedding_reference(x, wte, wpe, centres=centres, sos=sos, bert_mask=bert_mask,
                                           pos_offset=pos_offset)
    h, ids = palette_embedding_fwd(x, wte, wpe, centres, sos, bert_mask, pos_offset)
    return h, (x if x.dtype == torch.int64 else ids)
