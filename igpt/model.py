"""iGPT: a GPT-2 style decoder over 9-bit palette tokens (Chen et al., 2020).

One readable file. `Decoder` runs eager PyTorch ops (SDPA attention) and is the reference model; the Triton-kernel
model shares its parameters and state_dict exactly. Shapes: B batch, N tokens, C width, H heads, D head dim.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt.config import IGPTConfig

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # builds without torch.distributed
    DTensor = ()  # isinstance(x, ()) is False

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PALETTE_NAME = "palette.npy"


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """iGPT norm: x * rsqrt(mean(x^2) + eps) * g. No mean subtraction, no bias; fp32 statistics."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), written through silu(y) = y * sigmoid(y): its backward is one fused op instead of three
    passes over the [B, N, 4C] activation, and it saves one tensor, not two (eager fp32 training ~14 % faster on CPU;
    equal within fp32 rounding)."""
    return F.silu(1.702 * x) / 1.702


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """quick_gelu in place, for inference: the same three ops, bit-identical, without two fresh [B, N, 4C] buffers.
    On CPU the allocator hands large freed blocks back to the OS, and faulting fresh pages in cost more than the
    math (the sampler's prompt pass on a 2-core EPYC: ~4.5 ms per op out of place vs ~1.3 ms in place)."""
    return F.silu(x.mul_(1.702), inplace=True).div_(1.702)


class EagerOps:
    """The op implementations `Decoder` calls: plain PyTorch (SDPA attention)."""

    @staticmethod
    def norm(x, weight, eps):
        return rms_norm(x, weight, eps)

    @staticmethod
    def add_norm(x, residual, weight, eps):
        h = residual + x
        return rms_norm(h, weight, eps), h

    @staticmethod
    def attention(q, k, v, causal):
        return sdpa_attention(q, k, v, causal)


class FusedOps:
    """The op implementations `FusedDecoder` calls: the Triton kernels of igpt_kernels (which run their torch
    references on CPU tensors, and the kernels themselves under TRITON_INTERPRET=1)."""

    @staticmethod
    def norm(x, weight, eps):
        from igpt_kernels import norm

        return norm(x, weight, eps)

    @staticmethod
    def add_norm(x, residual, weight, eps):
        from igpt_kernels import norm

        # under autocast x (a linear's output) may be bf16 and the residual stream fp32: `residual + x` promotes
        return norm(x.to(residual.dtype), weight, eps, residual=residual)

    @staticmethod
    def attention(q, k, v, causal):
        from igpt_kernels import attention

        # torch.use_deterministic_algorithms(True) (the trainer's --deterministic) selects the atomic-free backward
        return attention(q, k, v, causal=causal, deterministic=torch.are_deterministic_algorithms_enabled())


class Norm(nn.Module):
    def __init__(self, dim: int, eps: float, ops=EagerOps):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """norm(x); with a residual, (norm(residual + x), residual + x): the kernels add and norm in one pass."""
        if residual is None:
            return self.ops.norm(x, self.weight, self.eps)
        return self.ops.add_norm(x, residual, self.weight, self.eps)


@torch.library.custom_op("igpt::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through oneDNN's matmul (dense weight, no packing), differentiable: the input gradient goes
    through oneDNN too, the weight gradient through torch.mm (MKL), the faster engine for each on the CPUs measured.
    A custom op, so that torch.compile keeps it as one call instead of lowering it to MKL's sgemm."""
    return _onednn_matmul(x.contiguous(), weight.contiguous())


@onednn_linear_op.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _onednn_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = onednn_linear_op(grad, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
    grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


onednn_linear_op.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


class Linear(nn.Linear):
    """nn.Linear whose fp32 CPU matmuls run through oneDNN (`onednn_linear_op`): fp32 F.linear is MKL's sgemm, which
    on the 2-core AMD EPYC ran the training shapes' forward and input-gradient GEMMs 1.1-2x slower than oneDNN
    (M = 4096 rows; the weight gradient stays on MKL, which was faster there); the peer training step ~10 % faster.
    Everything else (autocast, bf16, float64, GPU, DTensor weights, builds without oneDNN) calls F.linear, and so do
    inference graphs being compiled: Inductor packs frozen weights for oneDNN itself (`Decoder.compile_sampler`). The
    same products summed in another order: fp32 results can differ from F.linear in the last bits."""

    def forward(self, x):
        w = self.weight
        if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and not isinstance(w, DTensor) and not torch.is_autocast_enabled("cpu")
                and ONEDNN_LINEAR and (torch.is_grad_enabled() or not torch.compiler.is_compiling())):
            y = onednn_linear_op(x, w)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


@contextlib.contextmanager
def linear_weights_cast(model: nn.Module, dtype: torch.dtype):
    """Within the block every nn.Linear of `model` holds a `dtype` copy of its weight (a plain tensor): the cast that
    autocast makes at every call, made once. Sampling under autocast runs in it, because a compiled decode step would
    otherwise re-cast every weight at every token (eager autocast caches its casts; a compiled graph cannot). The
    results are the same: autocast's cast is this `.to(dtype)`."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = [m.weight for m in linears]
    try:
        for m, w in zip(linears, weights):
            m._parameters["weight"] = w.detach().to(dtype)  # in place in the dict: parameter order is kept
        yield
    finally:
        for m, w in zip(linears, weights):
            m._parameters["weight"] = w


def onednn_available() -> bool:
    """oneDNN's packed-weight linear (what torch.compile's CPU weight freezing emits) is in this PyTorch build."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"))


ONEDNN_LINEAR = onednn_available()  # read by Linear.forward (a constant, so torch.compile traces no build checks)
# What torch's oneDNN bf16 check asks of the CPU; AVX2-only CPUs (e.g. AMD Zen 3) have none of it.
ONEDNN_BF16_NEEDS = "AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX"


def onednn_supports(dtype: torch.dtype) -> bool:
    """oneDNN's linear runs `dtype` on this CPU: fp32 wherever the build has oneDNN, bf16 only where the CPU has
    ONEDNN_BF16_NEEDS (`torch.ops.mkldnn._is_mkldnn_bf16_supported`; elsewhere oneDNN's bf16 weight reorder raises).
    `torch.backends.cpu.get_cpu_capability()` cannot tell: it says "AVX2" also on CPUs with AVX-NE-CONVERT."""
    if not onednn_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


@contextlib.contextmanager
def onednn_packed_linears(model: nn.Module):
    """Within the block every CPU nn.Linear of `model` with an fp32 or bf16 weight multiplies through oneDNN, its weight
    packed once into oneDNN's blocked layout. For fp32, F.linear calls MKL's sgemm, which is slow on small batches and
    on AMD CPUs (measured on a 2-core AMD EPYC: 1.7x faster with one token per image, 4 images; 1.2-1.6x at 3840 rows).
    The same products, summed in another order: fp32 results can differ in the last bits. Other linears (float64,
    GPU), bf16 on CPUs where oneDNN cannot run it (`onednn_supports`) and builds without oneDNN keep F.linear."""
    dtypes = {dtype for dtype in (torch.float32, torch.bfloat16) if onednn_supports(dtype)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"
               and m.weight.dtype in dtypes and "forward" not in m.__dict__]  # (not packed yet: nesting is a no-op)
    try:
        for m in linears:
            m.forward = onednn_linear(m.weight, m.bias)  # an instance attribute wins over the class's forward
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


def onednn_linear(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x -> F.linear(x, weight, bias) through oneDNN, `weight` [out, in] packed once now (a snapshot: later changes to
    the weight are not seen). Inference only. Needs `onednn_supports(weight.dtype)`."""
    if not onednn_supports(weight.dtype):
        why = (f"oneDNN bf16 needs {ONEDNN_BF16_NEEDS}, this CPU has {torch.backends.cpu.get_cpu_capability()}"
               if onednn_available() else "this PyTorch build has no oneDNN linear")
        raise TypeError(f"oneDNN cannot run a {weight.dtype} linear ({why}): check onednn_supports(dtype) first and "
                        "use F.linear where it is False")
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    bias = None if bias is None else bias.detach().to(packed.dtype)

    def forward(x):
        if torch.is_grad_enabled():  # the packed copy is no Parameter: gradients would silently skip the weights
            raise RuntimeError("packed oneDNN linears are for inference: run the model under torch.no_grad()")
        # autocast has no rule for the oneDNN op: cast the input to the weight's dtype, as autocast would
        return _onednn_matmul(x.to(packed.dtype), packed, bias)
    return forward


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through oneDNN; `weight` dense [out, in] or packed by `_reorder_linear_weight`. The
    one place that calls the op (no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


@contextlib.contextmanager
def inference_linears(model: nn.Module, autocast_dtype: torch.dtype | None = None, pack: bool = True):
    """No-grad inference (sampling, probe features): under autocast (`autocast_dtype`) the linear weights are cast once
    (`linear_weights_cast`), and with `pack` the CPU ones multiply through packed oneDNN weights
    (`onednn_packed_linears`)."""
    with contextlib.ExitStack() as stack:
        if autocast_dtype is not None:
            stack.enter_context(linear_weights_cast(model, autocast_dtype))
        if pack:
            stack.enter_context(onednn_packed_linears(model))
        yield


class KVCache:
    """Keys and values of every layer for incremental decoding; filled left to right."""

    def __init__(self, n_layer: int, batch: int, n_head: int, n_ctx: int, head_dim: int, device, dtype):
        shape = (batch, n_head, n_ctx, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]  # read only up to length
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # tokens already cached (the same for every layer once a forward pass finished)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k/v for `layer`; returns all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sdpa_attention(q, k, v, causal: bool):
    """Eager attention for q [B,H,Nq,D], k/v [B,H,Nk,D] with Nq <= Nk; causal is aligned bottom-right
    (query i sees keys <= Nk - Nq + i), which is what decoding with a KV cache needs."""
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q == 1:  # a single new query sees every cached key
        return one_query_attention(q, k, v) if q.device.type == "cpu" else F.scaled_dot_product_attention(q, k, v)
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal aligns top-left, so chunked prefill needs an explicit bottom-right mask.
    mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def one_query_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v for one query per head (q [B,H,1,D]) as two batched matrix-vector products: decoding
    on CPU. PyTorch's CPU flash-attention kernel reads the cache at about half the speed of a plain pass over it with
    one query; the two products are ~1.5x faster per layer (2-core AMD EPYC, 900 cached keys, D = 32: 0.31 vs 0.47
    ms) and `generate` ~10 % faster."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    def __init__(self, cfg: IGPTConfig, ops=EagerOps):
        super().__init__()
        self.ops = ops
        self.n_head = cfg.n_head
        self.causal = cfg.causal
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, last_only: bool = False):
        """last_only: keys and values of every position (into the cache), the output of the last one only."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        if last_only:
            q, N = q[:, :, -1:], 1
        if q.dtype == k.dtype:
            y = self.ops.attention(q, k, v, self.causal)
        else:  # CPU decoding under autocast attends in the cache's fp32 (see Decoder.generate); autocast itself would
            with torch.autocast(x.device.type, enabled=False):  # cast the whole cache to bf16 at every call
                y = self.ops.attention(q.to(k.dtype), k, v, self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.fc(x)
        return self.proj(quick_gelu(h) if torch.is_grad_enabled() and h.requires_grad else quick_gelu_(h))


class Block(nn.Module):
    """Pre-norm transformer block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, cfg: IGPTConfig, ops=EagerOps):
        super().__init__()
        self.ln_1 = Norm(cfg.n_embd, cfg.norm_eps, ops)
        self.attn = Attention(cfg, ops)
        self.ln_2 = Norm(cfg.n_embd, cfg.norm_eps, ops)
        self.mlp = MLP(cfg)

    def forward(self, h, cache: KVCache | None = None, layer: int = 0, last_only: bool = False):
        a = self.attn(self.ln_1(h), cache, layer, last_only)
        x, h = self.ln_2(a, residual=h[:, -1:] if last_only else h)
        return h + self.mlp(x)


@dataclass
class IGPTOutput:
    logits: torch.Tensor  # [B, N, V]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layer + 1 raw residual streams [B, N, C]
    class_logits: torch.Tensor | None = None  # [B, n_classes]


# ----------------------------------------------------------------------------------------------------------------------
# The model


class Decoder(nn.Module):
    """iGPT decoder with eager PyTorch ops.

    AR:   logits = model(ids); logits[:, t] predicts ids[:, t] from ids[:, <t] (the learned SOS shift is inside).
    BERT: logits = model(ids, bert_mask=m); m True = masked (token embedding zeroed); bidirectional attention.
    """

    ops = EagerOps

    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.sos = nn.Parameter(torch.zeros(C))
        self.wpe = nn.Embedding(cfg.n_ctx, C)
        self.blocks = nn.ModuleList(Block(cfg, self.ops) for _ in range(cfg.n_layer))
        self.ln_f = Norm(C, cfg.norm_eps, self.ops)
        self.lm_head = Linear(C, cfg.vocab_size, bias=False)
        self.clf_head = Linear(C, cfg.n_classes) if cfg.n_classes else None
        self.palette = None  # see attach_palette; not part of the state_dict
        self.sampler_compiled = False  # see compile_sampler
        self._sampler_frozen = False  # compile_sampler(freeze=True) ...
        self._frozen_weights = None  # ... and the weights its graph was frozen with, once compiled
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Initialisation of the reference code (openai/image-gpt)."""
        C, L = self.cfg.n_embd, self.cfg.n_layer
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.sos, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=1 / math.sqrt(C))
            nn.init.normal_(block.attn.proj.weight, std=1 / math.sqrt(C * L))
            nn.init.normal_(block.mlp.fc.weight, std=0.02)
            nn.init.normal_(block.mlp.proj.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, Norm):
                nn.init.ones_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.lm_head.weight)  # "logits 0": the first loss is exactly ln(512)
        if self.clf_head is not None:
            nn.init.zeros_(self.clf_head.weight)

    # -- input checks and embedding ------------------------------------------------------------------------------------

    def _check_ids(self, ids: torch.Tensor, max_len: int | None = None) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor of int64 token ids, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise TypeError(f"ids must be an integer tensor (int64 token ids), got {ids.dtype}; "
                            "quantize pixels with Palette.quantize or pass pixels=... with a palette attached")
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape [batch, tokens], got {tuple(ids.shape)}; "
                             "flatten images in raster order with ids.reshape(B, -1)")
        max_len = self.cfg.n_ctx if max_len is None else max_len
        if ids.shape[1] > max_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds the context of {max_len} "
                             f"(resolution {self.cfg.resolution}); crop or resize the images")
        # The range check syncs with the device; torch.compile cannot put that in a graph, so compiled models skip it.
        if ids.numel() and not torch.compiler.is_compiling() and (
                int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.cfg.vocab_size - 1}, got range "
                             f"{int(ids.min())}..{int(ids.max())}")

    def _check_bert_mask(self, ids: torch.Tensor, bert_mask: torch.Tensor | None) -> None:
        if bert_mask is None:
            return
        if self.cfg.objective != "bert":
            raise ValueError("bert_mask was given to an AR model; build the model with objective='bert'")
        if not isinstance(bert_mask, torch.Tensor) or bert_mask.dtype != torch.bool:
            raise TypeError("bert_mask must be a bool tensor [B, N] (True = masked)")
        if bert_mask.shape != ids.shape:
            raise ValueError(f"bert_mask shape {tuple(bert_mask.shape)} must equal ids shape {tuple(ids.shape)}")

    def embed(self, ids: torch.Tensor, bert_mask: torch.Tensor | None = None, pos_offset: int = 0,
              shift: bool = True, check_ids: bool = True) -> torch.Tensor:
        """Token + position embedding. AR (shift=True): input at t is ids[t-1], the learned SOS at t = 0.
        BERT: masked positions keep only their position embedding. Decode steps: shift=False, no mask.
        check_ids=False: the ids were validated already (the fused embedding then skips its range check, a host
        sync); the eager lookup has no such check."""
        N = ids.shape[1]
        pos = self.wpe.weight[pos_offset:pos_offset + N]
        if self.cfg.objective == "ar" and shift:
            tok = self.wte(ids[:, :-1])
            sos = self.sos.to(tok.dtype).expand(ids.shape[0], 1, -1)
            return torch.cat([sos, tok], dim=1) + pos
        tok = self.wte(ids)
        if bert_mask is not None:
            tok = tok.masked_fill(bert_mask.unsqueeze(-1), 0.0)
        return tok + pos

    def _embed_input(self, ids, pixels, bert_mask=None):
        """(h^0, ids) for token ids or uint8 pixels (quantized through the attached palette)."""
        ids = self._resolve_input(ids, pixels)
        self._check_ids(ids)
        self._check_bert_mask(ids, bert_mask)
        return self.embed(ids, bert_mask), ids

    def _trunk(self, h, keep_hidden: bool):
        hidden = [h] if keep_hidden else None
        for block in self.blocks:
            h = block(h)
            if keep_hidden:
                hidden.append(h)
        return self.ln_f(h), hidden

    # -- forward ---------------------------------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor | None = None, *, bert_mask: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None, return_hidden: bool = False, return_classes: bool = False):
        """Logits [B, N, V]; with return_hidden / return_classes an `IGPTOutput` (hidden states are the raw residual
        streams h^0..h^L, not normed; class logits come from the mean over positions of ln_f(h^L))."""
        h, _ = self._embed_input(ids, pixels, bert_mask)
        x, hidden = self._trunk(h, keep_hidden=return_hidden)
        logits = self.lm_head(x)
        if not (return_hidden or return_classes):
            return logits
        class_logits = None
        if return_classes:
            if self.clf_head is None:
                raise ValueError("this model has no classifier head: build it with IGPTConfig(n_classes=...)")
            class_logits = self.clf_head(x.mean(dim=1))
        return IGPTOutput(logits, tuple(hidden) if return_hidden else None, class_logits)

    def loss(self, ids: torch.Tensor | None = None, bert_mask: torch.Tensor | None = None, *,
             pixels: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy in nats/token: AR mean over all tokens; BERT mean over the masked tokens.
        reduction="sum" gives the sum instead (the trainer divides by the global token count across ranks)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if self.cfg.objective == "bert" and bert_mask is None:
            raise ValueError("the BERT loss needs bert_mask (True = masked); draw one with "
                             "igpt.model.random_bert_mask((B, N), generator=g)")
        h, ids = self._embed_input(ids, pixels, bert_mask)
        logits = self.lm_head(self._trunk(h, keep_hidden=False)[0])
        if bert_mask is None:
            return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction=reduction)
        if reduction == "mean" and not bert_mask.any():
            raise ValueError("bert_mask masks no token, so the BERT loss is undefined")
        return F.cross_entropy(logits[bert_mask].float(), ids[bert_mask], reduction=reduction)

    @torch.no_grad()
    def features(self, ids: torch.Tensor | None = None, layers=None, *,
                 pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Linear-probe features [len(layers), B, C]: f^l = mean_t(blocks[l].ln_1(h^l)) for l < L and
        f^L = mean_t(ln_f(h^L)); pooled as the forward pass goes (no [B, N, C] is kept per layer).
        BERT models see no mask here."""
        L = self.cfg.n_layer
        layers = list(range(L + 1)) if layers is None else [int(layer) for layer in layers]
        if not layers or any(not 0 <= layer <= L for layer in layers):
            raise ValueError(f"layers must be a non-empty list of indices in 0..{L}, got {layers}")
        pooled = {}
        h, _ = self._embed_input(ids, pixels)
        for l in range(max(layers) + 1):
            if l in layers:
                norm = self.blocks[l].ln_1 if l < L else self.ln_f
                pooled[l] = norm(h).float().mean(dim=1)
            if l < L:
                h = self.blocks[l](h)
        return torch.stack([pooled[l] for l in layers])

    # -- pixels ------------------------------------------------------------------------------------------------------

    def attach_palette(self, palette) -> "Decoder":
        """Lets the model take uint8 RGB directly: model(pixels=x) with x [B, N, 3] or [B, H, W, 3]."""
        if len(palette) != self.cfg.vocab_size:
            raise ValueError(f"palette has {len(palette)} colours but the model's vocabulary is {self.cfg.vocab_size}")
        self.palette = palette
        return self

    def _resolve_input(self, ids, pixels):
        """Token ids, or the palette ids of uint8 pixels."""
        if (ids is None) == (pixels is None):
            raise ValueError("pass exactly one of ids (token ids) or pixels (uint8 RGB)")
        if pixels is None:
            return ids
        pixels = self._pixel_sequence(pixels)
        return self.palette.quantize(pixels).to(self.wte.weight.device)

    def _pixel_sequence(self, pixels) -> torch.Tensor:
        """Checked uint8 pixels as a raster-order sequence [B, N, 3]."""
        if self.palette is None:
            raise ValueError("model(pixels=...) needs a palette: call model.attach_palette(Palette.load(...)) first")
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels must be a uint8 torch.Tensor, got {type(pixels).__name__}")
        if pixels.dim() == 4:
            R = self.cfg.resolution
            if tuple(pixels.shape[1:3]) != (R, R):
                raise ValueError(f"images are {pixels.shape[1]}x{pixels.shape[2]} but the model expects {R}x{R}; "
                                 f"resize them to the model resolution")
            pixels = pixels.flatten(1, 2)
        if pixels.dim() != 3:
            raise ValueError(f"pixels must be [B, N, 3] or [B, H, W, 3], got shape {tuple(pixels.shape)}")
        if pixels.dtype != torch.uint8:
            raise TypeError(f"pixels must be uint8 RGB values in 0..255, got {pixels.dtype}")
        if pixels.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"{pixels.shape[1]} pixels exceed the context of {self.cfg.n_ctx} tokens")
        return pixels

    # -- sampling ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, n: int, prompt: torch.Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n images' tokens [n, n_ctx] with a KV cache: the prompt (ids [n or 1, P]) is encoded in one
        pass, then one token per step attends to the cache. Full softmax at temperature 1 unless told otherwise.
        On CPU the linears multiply through packed oneDNN weights (`onednn_packed_linears`)."""
        if self.cfg.objective != "ar":
            raise ValueError("generate needs an AR model (objective='ar')")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.cfg.vocab_size:
            raise ValueError(f"top_k must be in 1..{self.cfg.vocab_size}, got {top_k}")
        device = self.wte.weight.device
        N = self.cfg.n_ctx
        if prompt is None:
            prompt = torch.zeros(n, 0, dtype=torch.long, device=device)
        self._check_ids(prompt, max_len=N - 1)
        if prompt.shape[0] not in (1, n):
            raise ValueError(f"prompt batch {prompt.shape[0]} must be 1 or n={n}")
        prompt = prompt.to(device).expand(n, -1)
        # Under autocast the keys and values leave their linear layer in the autocast dtype. On GPU they are cached in
        # it (an fp32 cache would be cast back for every step's attention), and so they are on CPU when the decode step
        # is compiled with frozen weights: its own fused loops read a bf16 cache at half the bytes (256 new tokens, 8
        # layers x 256, 2-core EPYC: ~0.8x the time with an fp32 cache). Eager CPU decoding keeps the cache in the
        # weights' dtype and attends in it: PyTorch's CPU attention with one query is 3x slower in bf16 than in fp32
        # (AVX512-BF16 EPYC: 1.8 vs 0.3 ms per layer over 1000 cached keys), more than the casts cost.
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.wte.weight.dtype
        cache_dtype = dtype if device.type != "cpu" or self._sampler_frozen else self.wte.weight.dtype
        cache = KVCache(self.cfg.n_layer, n, self.cfg.n_head, N, self.cfg.head_dim, device, cache_dtype)
        cast = dtype if autocast else None
        # the prompt pass is eager; a compiled decode step leaves the GEMMs to Inductor (it cannot lower our packed
        # weights), and a frozen one has cast and packed its weights inside the graph
        if self._sampler_frozen:
            if self._frozen_weights is not None:
                self._check_frozen_weights()
            decode_linears = contextlib.nullcontext()
        else:
            decode_linears = inference_linears(self, cast, pack=not self.sampler_compiled)
        return self._sample(prompt, cache, temperature, top_k, generator, inference_linears(self, cast), decode_linears)

    def _sample(self, prompt, cache: KVCache, temperature: float, top_k: int | None, generator,
                prompt_linears=contextlib.nullcontext(), decode_linears=contextlib.nullcontext()) -> torch.Tensor:
        (n, P), N = prompt.shape, self.cfg.n_ctx
        out = torch.empty(n, N, dtype=torch.long, device=prompt.device)
        out[:, :P] = prompt
        # Step 0 feeds SOS and the prompt (the AR shift of prompt + one placeholder), so its last position predicts
        # token P; every later step feeds the token just drawn at its own position.
        with prompt_linears:
            # generate checked the prompt's ids (_check_ids): no second range check (a host sync) here
            logits = self._decode_step(self.embed(torch.cat([prompt, prompt.new_zeros(n, 1)], dim=1),
                                                  check_ids=False), cache, last_only=True)
        with decode_linears:
            for t in range(P, N):
                logits = logits[:, -1].float() / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)  # [n, 1]
                out[:, t] = token.squeeze(1)
                if t + 1 < N:
                    logits = self._decode_token(token, cache)
        return out

    def _decode_step(self, x: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Feed x [B, n, C] at the next n positions of the cache; logits of every position, or with `last_only` of
        the last one (the prompt pass of sampling: the last block then runs its attention output, MLP and the head
        for one position instead of n)."""
        n = x.shape[1]
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, last_only and layer == len(self.blocks) - 1)
        cache.length += n
        return self.lm_head(self.ln_f(x))

    def _decode_token(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, 1, V] after feeding one drawn token per image [B, 1] at the next position of the cache."""
        return _decode_token(self, ids, cache)

    def compile_sampler(self, freeze: bool | None = None, **options) -> "Decoder":
        """Opt-in: `torch.compile` the one-token step that `generate` repeats (the prompt pass stays eager). The cache
        length is a dynamic size, so one graph serves every position; the first `generate` pays the compile (about a
        minute on a 2-core CPU). `options` go to torch.compile. Returns self.

        freeze (default: on CPU) compiles with Inductor's weight freezing: the weights become constants of the graph,
        so their autocast casts are folded away and the linears multiply through weights packed for oneDNN, with the
        elementwise work and the one-query attention fused around them; under autocast the KV cache is then kept in
        the autocast dtype (see generate). 256 new tokens for 4 images, 8 layers x 256, 2-core EPYC, interleaved with
        eager: ~0.8x the eager time in fp32, ~0.67x in bf16. The graph holds the weights of its first call: `generate`
        refuses to run it once a parameter has changed (an optimizer step, load_state_dict, .to()); call
        compile_sampler() again, which compiles anew.
        Without freezing, the compiled step reads the live weights but multiplies through Inductor's default GEMMs,
        which on CPU were slower than the eager sampler's packed oneDNN weights."""
        if freeze is None:
            freeze = self.wte.weight.device.type == "cpu"
        # A fresh copy of the step's code: torch.compile keeps its graphs per code object, so a second compile_sampler
        # never reuses a graph frozen with older weights.
        step = types.FunctionType(_decode_token.__code__.replace(), globals(), "decode_token")
        compiled = torch.compile(step, dynamic=True, **options)
        if freeze:
            def decode_token(ids, cache):
                if self._frozen_weights is None:  # the first call compiles: the weights it freezes are today's
                    self._frozen_weights = self._weights_fingerprint()
                with torch._inductor.config.patch(freezing=True):  # read when the graph is compiled
                    return compiled(self, ids, cache)
        else:
            def decode_token(ids, cache):
                return compiled(self, ids, cache)
        self._decode_token = decode_token
        self._sampler_frozen, self._frozen_weights = freeze, None
        self.sampler_compiled = True
        return self

    def _weights_fingerprint(self) -> list:
        # _version counts in-place writes (optimizer steps, load_state_dict's copy_), data_ptr .to() and .data swaps
        return [(name, p.data_ptr(), p._version) for name, p in self.named_parameters()]

    def _check_frozen_weights(self) -> None:
        if self._weights_fingerprint() != self._frozen_weights:
            raise RuntimeError("the weights changed since the compiled sampler froze them into its graph (an optimizer "
                               "step, load_state_dict, .to()): call model.compile_sampler() again to recompile it")

    # -- serialisation -------------------------------------------------------------------------------------------------

    def save_pretrained(self, path) -> Path:
        """Write model.safetensors + config.json (+ palette.npy when attached) into the directory `path`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(self.cfg.to_json()))
        if self.palette is not None:
            self.palette.save(path / PALETTE_NAME)
        return path

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> "Decoder":
        """Load from a directory holding model.safetensors + config.json (a run dir), or a .safetensors file with
        config.json beside it. palette.npy next to the weights is attached when present."""
        weights, config = _resolve_weights(Path(path))
        try:
            cfg = IGPTConfig.from_dict(json.loads(config.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{config}: not a valid iGPT config.json ({e})") from e
        model = cls(cfg)
        if weights.is_dir():  # a resumable step-N checkpoint (DCP: trusted sources only)
            from igpt.checkpoint import load_model_weights

            state = {k: v.to(map_location) for k, v in load_model_weights(weights).items()}
        else:
            state = _load_safetensors(weights, map_location)
        model.load_state_dict(state)
        palette_file = (weights if weights.is_dir() else weights.parent) / PALETTE_NAME
        if palette_file.exists():
            from igpt.palette import Palette

            model.attach_palette(Palette.load(palette_file))
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict with errors that name the missing / unexpected / mis-shaped keys."""
        if strict:
            own = self.state_dict()
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            wrong = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                     for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
            if missing or unexpected or wrong:
                raise ValueError("state_dict does not match this model's config "
                                 f"(missing {missing}, unexpected {unexpected}, wrong shapes {wrong}); "
                                 "load it with the config it was saved with")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class FusedDecoder(Decoder):
    """`Decoder` on the Triton kernels of igpt_kernels: fused attention, norm and palette-lookup embedding.

    Same config, parameters and state_dict as `Decoder`. On CUDA tensors it runs the kernels; on CPU tensors the
    kernels' torch references (or, under TRITON_INTERPRET=1, the kernels themselves through the interpreter).
    With a palette attached, `model(pixels=x)` quantizes inside the embedding kernel: the input pipeline ships 3 bytes
    per token and no [B, N, 512] distance tensor is ever built.
    """

    ops = FusedOps

    def embed(self, ids, bert_mask=None, pos_offset: int = 0, shift: bool = True, check_ids: bool = True):
        from igpt_kernels import palette_embedding

        sos = self.sos if self.cfg.objective == "ar" and shift else None
        return palette_embedding(ids, self.wte.weight, self.wpe.weight, sos=sos, bert_mask=bert_mask,
                                 pos_offset=pos_offset, check_range=check_ids)[0]

    def _embed_input(self, ids, pixels, bert_mask=None):
        if pixels is None or (ids is not None):
            return super()._embed_input(ids, pixels, bert_mask)
        from igpt_kernels import palette_embedding

        pixels = self._pixel_sequence(pixels).to(self.wte.weight.device)
        if bert_mask is not None:
            self._check_bert_mask(pixels[..., 0], bert_mask)
        sos = self.sos if self.cfg.objective == "ar" else None
        centres = self.palette.centres.to(pixels.device)
        return palette_embedding(pixels, self.wte.weight, self.wpe.weight, centres=centres, sos=sos,
                                 bert_mask=bert_mask)


def _decode_token(model: Decoder, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """What Decoder.compile_sampler compiles (a copy of it per compile)."""
    # drawn tokens are in range by construction: no range check, so the step has no host sync
    return model._decode_step(model.embed(ids, pos_offset=cache.length, shift=False, check_ids=False), cache)


def random_bert_mask(shape, p: float = 0.15, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """BERT mask (True = masked): each token independently with probability p, as in the paper."""
    return torch.rand(shape, generator=generator, device=device) < p


# ----------------------------------------------------------------------------------------------------------------------
# Files


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory and rename it, so a crash never leaves a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; published weights get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _resolve_weights(path: Path) -> tuple[Path, Path]:
    """(weights, config.json): weights is a .safetensors file, or a step-N checkpoint directory (DCP)."""
    if path.is_dir():
        from igpt.checkpoint import MANIFEST, latest

        weights = path / WEIGHTS_NAME
        if (path / MANIFEST).exists():  # a step-N checkpoint
            weights = path
        elif not weights.exists():  # a run dir without final weights: its latest checkpoint
            weights = latest(path / "checkpoints")
            if weights is None:
                raise FileNotFoundError(f"no {WEIGHTS_NAME} and no checkpoints/step-N in {path}: pass a run "
                                        "directory, a step-N checkpoint directory, or a .safetensors file")
    elif path.suffix == ".safetensors":
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        weights = path
    else:
        raise ValueError(f"{path}: expected a directory or a .safetensors file")
    config = (weights if weights.is_dir() else weights.parent) / CONFIG_NAME
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing: the weights need the config.json they were saved with")
    return weights, config


def _load_safetensors(path: Path, map_location) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
