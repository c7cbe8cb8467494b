"""iGPT: a GPT-2 style decoder over 9-bit palette tokens (Chen et al., 2020).

`Decoder` runs eager PyTorch ops (SDPA attention) and is the reference model; `FusedDecoder` runs the Triton kernels
of igpt_kernels and shares its parameters and state_dict exactly. Shapes: B batch, N tokens, C width, H heads, D head
dim. Sampling lives in igpt/sampling.py, model files in igpt/files.py, CPU speed-ups in igpt/cpu.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import igpt_kernels
from igpt.config import IGPTConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """iGPT norm: x * rsqrt(mean(x^2) + eps) * g. No mean subtraction, no bias; fp32 statistics."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), written through silu(y) = y * sigmoid(y): its backward is one fused op instead of three
    passes over the [B, N, 4C] activation, and it saves one tensor, not two (equal within fp32 rounding)."""
    return F.silu(1.702 * x) / 1.702


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
        return igpt_kernels.norm(x, weight, eps)

    @staticmethod
    def add_norm(x, residual, weight, eps):
        # under autocast x (a linear's output) may be bf16 and the residual stream fp32: `residual + x` promotes
        return igpt_kernels.norm(x.to(residual.dtype), weight, eps, residual=residual)

    @staticmethod
    def attention(q, k, v, causal):
        # torch.use_deterministic_algorithms(True) (the trainer's --deterministic) selects the atomic-free backward
        deterministic = torch.are_deterministic_algorithms_enabled()
        return igpt_kernels.attention(q, k, v, causal=causal, deterministic=deterministic)


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
    on CPU, where PyTorch's flash-attention kernel reads the cache at about half the speed of a plain pass over it."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    def __init__(self, cfg: IGPTConfig, ops=EagerOps):
        super().__init__()
        self.ops = ops
        self.n_head = cfg.n_head
        self.causal = cfg.causal
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, cache=None, layer: int = 0, last_only: bool = False):
        """With a KV cache (igpt.sampling.KVCache) x holds the next positions; last_only: keys and values of every
        position go into the cache, the output is the last position's only."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if last_only:
            q, N = q[:, :, -1:], 1
        if cache is None:
            y = self.ops.attention(q, k, v, self.causal)
        else:
            y = cache.attend(layer, q, k, v, self.ops.attention, self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.proj(quick_gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, cfg: IGPTConfig, ops=EagerOps):
        super().__init__()
        self.ln_1 = Norm(cfg.n_embd, cfg.norm_eps, ops)
        self.attn = Attention(cfg, ops)
        self.ln_2 = Norm(cfg.n_embd, cfg.norm_eps, ops)
        self.mlp = MLP(cfg)

    def forward(self, h, cache=None, layer: int = 0, last_only: bool = False):
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
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.clf_head = nn.Linear(C, cfg.n_classes) if cfg.n_classes else None
        self.palette = None  # see attach_palette; not part of the state_dict
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

    def check_ids(self, ids: torch.Tensor, max_len: int | None = None) -> None:
        """Token ids [B, N <= max_len] of an integer dtype, in the vocabulary (TypeError / ValueError otherwise)."""
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
        """Token + position embedding. AR (shift=True): input at t is ids[t-1], the learned SOS at t = 0. BERT: masked
        positions keep only their position embedding. Decode steps: shift=False, no mask. check_ids=False: the ids were
        validated already (the fused embedding then skips its range check, a host sync)."""
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

    def embed_input(self, ids, pixels, bert_mask=None):
        """(h^0, ids) for token ids or uint8 pixels (quantized through the attached palette)."""
        ids = self._resolve_input(ids, pixels)
        self.check_ids(ids)
        self._check_bert_mask(ids, bert_mask)
        return self.embed(ids, bert_mask), ids

    def _trunk(self, h, keep_hidden: bool):
        hidden = [h] if keep_hidden else None
        for block in self.blocks:
            h = block(h)
            if keep_hidden:
                hidden.append(h)
        return self.ln_f(h), hidden

    # -- forward -------------------------------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor | None = None, *, bert_mask: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None, return_hidden: bool = False, return_classes: bool = False):
        """Logits [B, N, V]; with return_hidden / return_classes an `IGPTOutput` (hidden states are the raw residual
        streams h^0..h^L, not normed; class logits come from the mean over positions of ln_f(h^L))."""
        h, _ = self.embed_input(ids, pixels, bert_mask)
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
        h, ids = self.embed_input(ids, pixels, bert_mask)
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
        h, _ = self.embed_input(ids, pixels)
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

    def generate(self, n: int, prompt: torch.Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n images' tokens [n, n_ctx] with a KV cache: the prompt (ids [n or 1, P]) in one pass, then one token
        per step; full softmax at temperature 1 unless told otherwise. `igpt.sampling.Sampler(self)` does the work."""
        from igpt.sampling import Sampler

        return Sampler(self).generate(n, prompt, temperature, top_k, generator)

    def decode(self, x: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        """Feed embeddings x [B, n, C] at the next n positions of the KV cache; logits of every position, or with
        `last_only` of the last one (a prompt pass: the last block's attention output, MLP and head for one only)."""
        n = x.shape[1]
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, last_only and layer == len(self.blocks) - 1)
        cache.length += n
        return self.lm_head(self.ln_f(x))

    # -- files ---------------------------------------------------------------------------------------------------------

    def save_pretrained(self, path) -> Path:
        """Write model.safetensors + config.json (+ palette.npy when attached) into the directory `path`."""
        from igpt import files

        return files.save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> "Decoder":
        """Load from a directory holding model.safetensors + config.json (a run dir), a step-N checkpoint directory,
        or a .safetensors file with config.json beside it. palette.npy next to the weights is attached when present."""
        from igpt import files

        return files.load_pretrained(cls, path, map_location)

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
    """`Decoder` on the Triton kernels of igpt_kernels (fused attention, norm and palette-lookup embedding), with the
    same config, parameters and state_dict. CUDA tensors run the kernels, CPU tensors their torch references (or the
    kernels under TRITON_INTERPRET=1). With a palette attached, `model(pixels=x)` quantizes inside the embedding
    kernel: the input pipeline ships 3 bytes per token and no [B, N, 512] distance tensor is ever built."""

    ops = FusedOps

    def embed(self, ids, bert_mask=None, pos_offset: int = 0, shift: bool = True, check_ids: bool = True):
        sos = self.sos if self.cfg.objective == "ar" and shift else None
        return igpt_kernels.palette_embedding(ids, self.wte.weight, self.wpe.weight, sos=sos, bert_mask=bert_mask,
                                 pos_offset=pos_offset, check_range=check_ids)[0]

    def embed_input(self, ids, pixels, bert_mask=None):
        if pixels is None or (ids is not None):
            return super().embed_input(ids, pixels, bert_mask)
        pixels = self._pixel_sequence(pixels).to(self.wte.weight.device)
        if bert_mask is not None:
            self._check_bert_mask(pixels[..., 0], bert_mask)
        sos = self.sos if self.cfg.objective == "ar" else None
        centres = self.palette.centres.to(pixels.device)
        return igpt_kernels.palette_embedding(pixels, self.wte.weight, self.wpe.weight, centres=centres, sos=sos,
                                 bert_mask=bert_mask)


def random_bert_mask(shape, p: float = 0.15, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """BERT mask (True = masked): each token independently with probability p, as in the paper."""
    return torch.rand(shape, generator=generator, device=device) < p
