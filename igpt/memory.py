"""Peak-memory estimator for iGPT training: what one rank holds at the worst moment of a step.

    est = estimate(IGPTConfig.preset("l", resolution=48), micro_batch=8, world_size=8, ac="full")
    est.total, est.breakdown(), est.phase          # bytes per rank; the per-term split of the peak
    max_micro_batch(cfg, 80 * GiB, world_size=8, ac="full")
    python -m igpt.memory --preset s m l --resolution 48 --gpus 8 --gpu-mem-gib 80 --ac none full

It is an *estimate*: a byte count of the tensors the step keeps alive, derived below from what autograd saves for this
model's ops. It is checked on CPU against measurement (tests/test_memory.py): the bytes autograd really saves
(`torch.autograd.graph.saved_tensors_hooks`, unique storages) and the peak of one forward + backward + AdamW step
(every CPU allocator event of `torch.profiler.profile(profile_memory=True)`, summed in time order). No GPU
measurement backs it yet; CUDA adds what no tensor count sees (context, NCCL and cuBLAS buffers, caching-allocator
fragmentation): the `workspace` term is a flat allowance for that (`workspace_bytes`, 0 by default, 3 GiB in the CLI).

Checked (tiny preset at 16x16 = 256 tokens, fp32, CPU): one block's saved bytes equal the formula exactly for Decoder
(eager norm + SDPA), FusedDecoder on CPU (materialized attention), bf16 autocast, and FusedDecoder's Triton kernels
under TRITON_INTERPRET=1 (fused norm + flash attention, fp32 and fp16); a whole forward pass within 0.01 %. The peak
of one AdamW step at micro-batch 2: 36.69 MiB measured / 36.69 estimated without AC, 21.41 / 22.29 with full AC,
26.18 / 26.54 with every-2 (the block-backward transient below is a slight over-estimate).

Precision policies (`policy=`; every dtype can be overridden one by one)
-----------------------------------------------------------------------
  "fsdp-bf16"     FSDP2 (fully_shard per block, then the root) with MixedPrecisionPolicy(param_dtype=bf16,
                  reduce_dtype=fp32): fp32 master params, fp32 grads and fp32 AdamW states sharded over the W ranks;
                  bf16 params all-gathered per block; bf16 activations and residual stream; FusedDecoder (fused norm,
                  flash attention); foreach AdamW (CUDA's default). The GPU training setup.
  "fp32"          one process, everything fp32, no sharding; Decoder (eager norm, torch SDPA), for-loop AdamW (CPU's
                  default). What the tests measure.
  "autocast-bf16" one process, fp32 params/grads/AdamW, bf16 autocast, FusedDecoder, foreach AdamW: igpt/train.py
                  on one GPU. Autocast keeps a bf16 copy of every Linear weight until backward (counted in
                  gathered_params); the residual stream stays fp32 because the embeddings are fp32.

Notation: B micro-batch, N = resolution^2 tokens, C width, H heads, L layers, V = 512, P = cfg.num_params(),
Pb = 12C^2 + 2C params per block (+9C with biases), Pr = P - L*Pb (embeddings, ln_f, heads: FSDP's root group);
s = bytes of the residual stream (= param dtype), a = bytes of activations (autocast dtype, else param dtype);
p/m/g/o = bytes of compute params / master params / grads / AdamW states; f = fraction of tokens in the loss
(1 for AR, bert_mask_prob for BERT).

Saved for backward per block, bytes per token (each tensor counted once by storage)
------------------------------------------------------------------------------------
  tensor                                     saved by               bytes/token
  ln_1 input x (the block input h)           norm                   eager (Decoder's rms_norm and the kernels' CPU
                                                                    reference): 4C (x.float(): x itself if s=4,
                                                                    else an fp32 copy); fused (Triton): sC
  x * rstd (fp32)                            norm (eager only)      4C
  rstd                                       norm                   4
  ln_1 output                                qkv Linear             aC
  q, k, v (views of the qkv output)          attention              3aC
  O                                          attention              aC   (materialized: not kept)
  LSE (fp32, per head)                       attention              4H   (materialized: none)
  proj input = O transposed to [B,N,C]       proj Linear            flash, sdpa (both lay O out as [B,N,H,D]
                                                                    memory): a view, 0; materialized: aC copy
  softmax(S) [and softmax(S)*row_mask]       matmul (materialized)  H*N*a per copy: 2 copies causal, 1 bidirectional
  ln_2 input, x * rstd, rstd, ln_2 output    norm, fc Linear        as for ln_1
  1.702 u (u = fc output)                    quick-GELU's silu      4aC
  quick-GELU output                          mlp.proj Linear        4aC
  per block, not per token (materialized causal): the [N,N] bool mask, N^2 bytes, and an [N] row mask, N*a

  Sum, flash/sdpa:  2*norm + 4aC + 8aC + 8 + 4H   with norm = (8 + a)C eager, (s + a)C fused
    Decoder, fp32, CPU (eager, sdpa):          72C + 8 + 4H   = 18 fp32 numbers of width C per token
    FusedDecoder, bf16 FSDP (fused, flash):    32C + 8 + 4H   (iGPT-L at 48^2: 113 MB per sample per block)
    materialized (FusedDecoder on CPU): flash/sdpa's 4aC + 4H becomes 4aC + (1 or 2)HNa, i.e. O(N^2).

  Activation checkpointing (torch.utils.checkpoint, non-reentrant, per block): a checkpointed block keeps only its
  input (sC per token); its backward recomputes it, so one block's saved tensors are live again. "every-K", as
  igpt/train.py wraps them: blocks 0, K, 2K, ... are checkpointed (ceil(L / K) of them; every-1 = full).

Head and loss (not checkpointed): ln_f saves a norm term as above (its output is lm_head's input), cross-entropy
saves the fp32 log-probs, 4Vf per token. Decoder.loss computes logits [B,N,V] in a, casts them to fp32 and takes
log_softmax. In the loss backward, the nll gradient and the log_softmax input gradient are two more fp32 [B,N,V]
tensors: the loss costs 12Vf bytes/token at its peak (for BERT also the a*V(1+f) of the masked-index backward).
Inputs: the int64 ids, 8 bytes per token (+1 for a BERT mask).

Peak = the largest of these moments (`phase`):
  loss-backward   persistent + gathered + inputs + saved(all blocks) + head + loss transient
  block-backward  persistent + gathered + inputs + saved(blocks < l) + block l's saved (with AC: its input + its
                  recompute) + grads so far (root + blocks >= l) + the block's backward transient, maximised over l;
                  transient = dh (sC) + two [B,N,4C] activation gradients (8aC) (+ two [B,H,N,N] for materialized
                  attention) per token, + with FSDP one block's unsharded grad in p and its copy in the reduce dtype
  forward         the end of the forward pass: saved(all) + the last block's forward temporaries (4aC per token,
                  + 2HNa materialized) + the logits (aV + 4V + 4V with f): never above loss-backward in practice
  optimizer       persistent + all grads + AdamW temporaries (foreach: one state-sized list; for-loop: 3 copies of
                  the largest tensor; fused: none)
  persistent = params (P*m/W with FSDP, else P*p) + AdamW states (2*P*o, /W with FSDP); grads are None between
  steps (zero_grad(set_to_none=True)) unless grad_accum > 1, where they are held through the backward as well.
  gathered (FSDP) = Pr*p (the root stays unsharded from forward to the end of backward) + 2 blocks * Pb*p (the
  block running and the one prefetched); autocast (a != p) adds the a-copies of all Linear weights.

Not modelled: allocator rounding/fragmentation (CUDA: see workspace), FSDP's per-parameter padding to W, the
gradient-norm clipping's small buffers, the classifier head, torch.compile's fused buffers (it usually saves less).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from igpt import cli
from igpt.config import IGPTConfig

GiB = 1 << 30
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}
_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}
ATTENTION = ("flash", "sdpa", "materialized")
NORMS = ("fused", "eager")
OPTIMIZERS = ("foreach", "for-loop", "fused")

# Defaults of each policy; explicit keyword arguments of `estimate` override them one by one.
POLICIES: dict[str, dict] = {
    "fsdp-bf16": dict(fsdp=True, param_dtype=torch.bfloat16, activation_dtype=None, master_dtype=torch.float32,
                      grad_dtype=torch.float32, optim_dtype=torch.float32, reduce_dtype=torch.float32,
                      norm="fused", attention="flash", optimizer="foreach"),
    "fp32": dict(fsdp=False, param_dtype=torch.float32, activation_dtype=None, master_dtype=None,
                 grad_dtype=None, optim_dtype=None, reduce_dtype=None,
                 norm="eager", attention="sdpa", optimizer="for-loop"),
    "autocast-bf16": dict(fsdp=False, param_dtype=torch.float32, activation_dtype=torch.bfloat16, master_dtype=None,
                          grad_dtype=None, optim_dtype=None, reduce_dtype=None,
                          norm="fused", attention="flash", optimizer="foreach"),
}
_UNSET = object()


def _dtype(value, name: str) -> torch.dtype:
    if isinstance(value, str):
        if value.lower() not in _DTYPE_NAMES:
            raise ValueError(f"{name}={value!r}: use one of {sorted(_DTYPE_NAMES)} or a torch dtype")
        value = _DTYPE_NAMES[value.lower()]
    if value not in _DTYPE_BYTES:
        raise TypeError(f"{name} must be a floating torch dtype (fp32, bf16, fp16, fp64) or its name, got {value!r}")
    return value


def _nbytes(dtype: torch.dtype) -> int:
    return _DTYPE_BYTES[dtype]


def checkpointed_blocks(ac: str, n_layer: int) -> list[bool]:
    """Which blocks run under activation checkpointing: "none", "full" or "every-K" (blocks 0, K, 2K, ..., as
    igpt/train.py wraps them; every-1 is full)."""
    if ac == "none":
        return [False] * n_layer
    if ac == "full":
        return [True] * n_layer
    if isinstance(ac, str) and ac.startswith("every-"):
        k = ac.removeprefix("every-")
        if k.isdigit() and int(k) >= 1:
            return [i % int(k) == 0 for i in range(n_layer)]
    raise ValueError(f"ac must be 'none', 'full' or 'every-K' with K >= 1 (e.g. 'every-2'), got {ac!r}")


@dataclass(frozen=True)
class Setup:
    """The resolved knobs of one estimate (policy defaults plus overrides)."""

    micro_batch: int
    world_size: int
    fsdp: bool
    ac: str
    param_dtype: torch.dtype
    activation_dtype: torch.dtype
    master_dtype: torch.dtype
    grad_dtype: torch.dtype
    optim_dtype: torch.dtype
    reduce_dtype: torch.dtype
    norm: str
    attention: str
    optimizer: str
    grad_accum: int
    bert_mask_prob: float
    workspace_bytes: int


@dataclass
class MemoryEstimate:
    """Bytes one rank holds at the peak of a training step, split by term. `total` is their sum."""

    params: int  # master parameters held by this rank (sharded with FSDP)
    gathered_params: int  # unsharded param-dtype copies (FSDP all-gathers) + autocast weight casts
    grads: int  # gradients alive at the peak (sharded with FSDP)
    optimizer: int  # AdamW exp_avg + exp_avg_sq (sharded with FSDP) + the step's temporaries in "optimizer"
    activations: int  # tensors the blocks saved for backward, alive at the peak (with AC: inputs + a recompute)
    head: int  # saved by ln_f, lm_head and the loss (fp32 log-probs [B,N,V])
    transient: int  # short-lived buffers at the peak: loss backward's [B,N,V] grads, a block's backward grads, ...
    inputs: int  # the batch: int64 ids (+ BERT mask)
    workspace: int  # flat allowance: CUDA context, NCCL, allocator fragmentation (0 unless asked for)
    phase: str  # the moment of the peak: "forward", "loss-backward", "block-backward" or "optimizer"
    setup: Setup = field(repr=False)
    phases: dict = field(default_factory=dict, repr=False)  # total bytes at each candidate moment
    state: dict = field(default_factory=dict, repr=False)  # batch-independent: params, all grads, AdamW states

    TERMS = ("params", "gathered_params", "grads", "optimizer", "activations", "head", "transient", "inputs",
             "workspace")

    @property
    def total(self) -> int:
        return sum(getattr(self, t) for t in self.TERMS)

    def breakdown(self) -> dict[str, int]:
        return {t: getattr(self, t) for t in self.TERMS}

    def __str__(self) -> str:
        rows = [f"{t:<16}{getattr(self, t) / GiB:10.3f} GiB" for t in self.TERMS]
        return "\n".join(rows + [f"{'total':<16}{self.total / GiB:10.3f} GiB  (peak at {self.phase})"])


# ----------------------------------------------------------------------------------------------------------------------
# Per-token formulas


def block_param_count(cfg: IGPTConfig) -> int:
    C = cfg.n_embd
    return 12 * C * C + 2 * C + (9 * C if cfg.bias else 0)


def saved_per_block(cfg: IGPTConfig, micro_batch: int, *, stream_bytes: int, act_bytes: int, norm: str,
                    attention: str) -> dict[str, int]:
    """Bytes one non-checkpointed block saves for backward, by tensor (the table in the module docstring)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    C, H, N, s, a = cfg.n_embd, cfg.n_head, cfg.n_ctx, stream_bytes, act_bytes
    T = micro_batch * N  # tokens
    norm_in = 4 * C if norm == "eager" else s * C
    terms = {
        "norm_inputs": 2 * T * norm_in,
        "norm_xhat_fp32": 2 * T * 4 * C if norm == "eager" else 0,
        "norm_rstd": 2 * T * 4,
        "norm_outputs": 2 * T * a * C,
        "qkv": 3 * T * a * C,
    }
    if attention == "materialized":
        copies = 2 if cfg.causal else 1
        terms["attn_probs"] = copies * T * H * N * a
        terms["attn_masks"] = (N * N + N * a) if cfg.causal else 0
        terms["attn_out"] = 0
        terms["attn_lse"] = 0
        terms["proj_input"] = T * a * C
    else:
        terms["attn_out"] = T * a * C
        terms["attn_lse"] = T * 4 * H
        terms["proj_input"] = 0  # flash and sdpa both write O as [B,N,H,D] memory: the proj reads a view
    terms["mlp_silu_in"] = 4 * T * a * C
    terms["mlp_gelu_out"] = 4 * T * a * C
    return terms


def _resolve(cfg, micro_batch, world_size, policy, overrides) -> Setup:
    if not isinstance(cfg, IGPTConfig):
        raise TypeError(f"cfg must be an IGPTConfig, got {type(cfg).__name__}")
    for name, value in (("micro_batch", micro_batch), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    knobs = dict(POLICIES[policy])
    knobs.update({k: v for k, v in overrides.items() if v is not _UNSET})
    if world_size > 1 and not knobs["fsdp"]:
        raise ValueError(f"world_size={world_size} needs fsdp=True (policy 'fsdp-bf16'): without sharding every "
                         "rank holds the whole model, so estimate with world_size=1")
    param = _dtype(knobs["param_dtype"], "param_dtype")
    act = _dtype(knobs["activation_dtype"] or param, "activation_dtype")
    master = _dtype(knobs["master_dtype"] or param, "master_dtype")
    grad = _dtype(knobs["grad_dtype"] or master, "grad_dtype")
    optim = _dtype(knobs["optim_dtype"] or master, "optim_dtype")
    reduce = _dtype(knobs["reduce_dtype"] or param, "reduce_dtype")
    if knobs["norm"] not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {knobs['norm']!r}")
    if knobs["attention"] not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {knobs['attention']!r}")
    if knobs["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {knobs['optimizer']!r}")
    checkpointed_blocks(knobs["ac"], cfg.n_layer)  # validates
    grad_accum = knobs["grad_accum"]
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive int, got {grad_accum!r}")
    if not 0 < knobs["bert_mask_prob"] <= 1:
        raise ValueError(f"bert_mask_prob must be in (0, 1], got {knobs['bert_mask_prob']!r}")
    if knobs["workspace_bytes"] < 0:
        raise ValueError(f"workspace_bytes must be >= 0, got {knobs['workspace_bytes']!r}")
    return Setup(micro_batch=micro_batch, world_size=world_size, fsdp=bool(knobs["fsdp"]), ac=knobs["ac"],
                 param_dtype=param, activation_dtype=act, master_dtype=master, grad_dtype=grad, optim_dtype=optim,
                 reduce_dtype=reduce, norm=knobs["norm"], attention=knobs["attention"], optimizer=knobs["optimizer"],
                 grad_accum=grad_accum, bert_mask_prob=float(knobs["bert_mask_prob"]),
                 workspace_bytes=int(knobs["workspace_bytes"]))


def estimate(cfg: IGPTConfig, micro_batch: int, *, world_size: int = 1, policy: str = "fsdp-bf16",
             ac=_UNSET, fsdp=_UNSET, param_dtype=_UNSET, activation_dtype=_UNSET, master_dtype=_UNSET,
             grad_dtype=_UNSET, optim_dtype=_UNSET, reduce_dtype=_UNSET, norm=_UNSET, attention=_UNSET,
             optimizer=_UNSET, grad_accum=_UNSET, bert_mask_prob=_UNSET, workspace_bytes=_UNSET) -> MemoryEstimate:
    """Peak bytes per rank of one training step (forward, backward, AdamW step) at `micro_batch` sequences per rank.

    policy: "fsdp-bf16" (default), "fp32" or "autocast-bf16" (module docstring); keyword arguments override it:
    ac "none" | "full" | "every-K"; fsdp (shard params/grads/AdamW over world_size); dtypes as torch dtypes or names
    ("fp32", "bf16"): param_dtype (compute params = residual stream), activation_dtype (autocast; default
    param_dtype), master_dtype, grad_dtype, optim_dtype, reduce_dtype; norm "fused" | "eager"; attention "flash"
    (igpt_kernels) | "sdpa" (torch SDPA flash/efficient) | "materialized" ([N,N] scores, the CPU reference);
    optimizer "foreach" | "for-loop" | "fused"; grad_accum (> 1 keeps grads through the backward);
    bert_mask_prob (BERT loss fraction); workspace_bytes (flat allowance added to the total).
    """
    su = _resolve(cfg, micro_batch, world_size, policy, dict(
        ac="none" if ac is _UNSET else ac, fsdp=fsdp, param_dtype=param_dtype, activation_dtype=activation_dtype,
        master_dtype=master_dtype, grad_dtype=grad_dtype, optim_dtype=optim_dtype, reduce_dtype=reduce_dtype,
        norm=norm, attention=attention, optimizer=optimizer, grad_accum=1 if grad_accum is _UNSET else grad_accum,
        bert_mask_prob=0.15 if bert_mask_prob is _UNSET else bert_mask_prob,
        workspace_bytes=0 if workspace_bytes is _UNSET else workspace_bytes))
    return _estimate(cfg, su)


def _estimate(cfg: IGPTConfig, su: Setup) -> MemoryEstimate:
    B, N, C, H, L, V = su.micro_batch, cfg.n_ctx, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size
    T = B * N
    p, a = _nbytes(su.param_dtype), _nbytes(su.activation_dtype)
    s = p  # the residual stream has the dtype of the embeddings, i.e. of the compute params
    W = su.world_size if su.fsdp else 1
    P, Pb = cfg.num_params(), block_param_count(cfg)
    Pr = P - L * Pb
    bert = cfg.objective == "bert"
    f = su.bert_mask_prob if bert else 1.0

    # Persistent state.
    if su.fsdp:
        params = math.ceil(P * _nbytes(su.master_dtype) / W)
        grads_block, grads_root = (math.ceil(n * _nbytes(su.grad_dtype) / W) for n in (Pb, Pr))
        states = math.ceil(2 * P * _nbytes(su.optim_dtype) / W)
    else:
        params = P * p
        grads_block, grads_root = Pb * _nbytes(su.grad_dtype), Pr * _nbytes(su.grad_dtype)
        states = 2 * P * _nbytes(su.optim_dtype)
    grads_all = L * grads_block + grads_root
    held_grads = grads_all if su.grad_accum > 1 else 0
    linear_weights = L * (12 * C * C) + V * C
    gathered = (Pr * p + min(2, L) * Pb * p) if su.fsdp else 0
    if a != p:
        gathered += linear_weights * a  # autocast's weight casts, saved for backward
    inputs = T * (8 + (1 if bert else 0))

    # Activations.
    sv = _saved(cfg, su)
    per_block, saved, ckpt, head = sum(sv["per_block"].values()), sv["saved"], sv["checkpointed"], sv["head"]
    ckpt_input = T * s * C
    # A recomputed block re-saves everything except its input, which the checkpoint already holds, when the norm
    # saves x itself (fused norm, or the eager norm on an fp32 stream, where x.float() is x).
    recompute = per_block - (ckpt_input if (su.norm == "fused" or s == 4) else 0)
    loss_peak = max(12 * T * f * V, (a * T * V * (1 + f)) if bert else 0)
    loss_transient = math.ceil(loss_peak - T * f * 4 * V)
    attn_nn = 2 * T * H * N * a if su.attention == "materialized" else 0
    block_transient = T * (s * C + 8 * a * C) + attn_nn
    if su.fsdp:
        block_transient += Pb * p + (Pb * _nbytes(su.reduce_dtype) if su.reduce_dtype != su.param_dtype else 0)

    base = dict(params=params, gathered_params=gathered, inputs=inputs, workspace=su.workspace_bytes)
    everything = dict(base, grads=held_grads, optimizer=states, activations=sum(saved))
    candidates = [
        # End of the forward pass: the last block's temporaries, then the logits (a, and their fp32 copy) next to
        # the log-probs.
        ("forward", dict(everything, head=0, transient=T * 4 * a * C + attn_nn)),
        ("forward", dict(everything, head=head, transient=T * V * a + (math.ceil(T * f) * 4 * V if a != 4 else 0))),
        ("loss-backward", dict(everything, head=head, transient=loss_transient)),
    ]
    for i in reversed(range(L)):  # the backward of block i
        live = sum(saved[:i]) + (ckpt_input + recompute if ckpt[i] else saved[i])
        grads = grads_all if su.grad_accum > 1 else grads_root + (L - i) * grads_block
        candidates.append(("block-backward", dict(base, grads=grads, optimizer=states, activations=live, head=0,
                                                  transient=block_transient)))
    if su.optimizer == "foreach":
        opt_tmp = math.ceil(P * _nbytes(su.optim_dtype) / W)
    elif su.optimizer == "for-loop":
        largest = max(V * C, N * C, 4 * C * C)
        opt_tmp = 3 * math.ceil(largest * _nbytes(su.optim_dtype) / W)
    else:
        opt_tmp = 0
    candidates.append(("optimizer", dict(base, gathered_params=0, grads=grads_all, optimizer=states + opt_tmp,
                                         activations=0, head=0, transient=0)))

    totals = {}
    best = None
    for phase, terms in candidates:
        total = sum(terms.values())
        totals[phase] = max(totals.get(phase, 0), total)
        if best is None or total > best[0]:
            best = (total, phase, terms)
    _, phase, terms = best
    return MemoryEstimate(**terms, phase=phase, setup=su, phases=totals,
                          state=dict(params=params, grads=grads_all, optimizer=states))


def saved_activation_bytes(cfg: IGPTConfig, micro_batch: int, *, policy: str = "fsdp-bf16", **overrides) -> dict:
    """What the forward pass leaves saved for backward, in bytes: {"blocks": all blocks (a checkpointed one counts
    its input only), "head": ln_f + lm_head + loss, "per_block": {tensor: bytes} of one non-checkpointed block}."""
    su = estimate(cfg, micro_batch, policy=policy, **overrides).setup
    return _saved(cfg, su)


def _saved(cfg: IGPTConfig, su: Setup) -> dict:
    B, N, C, V = su.micro_batch, cfg.n_ctx, cfg.n_embd, cfg.vocab_size
    T = B * N
    s, a = _nbytes(su.param_dtype), _nbytes(su.activation_dtype)
    per_block = saved_per_block(cfg, B, stream_bytes=s, act_bytes=a, norm=su.norm, attention=su.attention)
    ckpt = checkpointed_blocks(su.ac, cfg.n_layer)
    blocks = [T * s * C if c else sum(per_block.values()) for c in ckpt]
    f = su.bert_mask_prob if cfg.objective == "bert" else 1.0
    norm_head = T * ((4 * C + 4 * C) if su.norm == "eager" else s * C) + T * 4 + T * a * C
    head = norm_head + math.ceil(T * f * 4 * V) + (math.ceil(T * f) * 16 if cfg.objective == "bert" else 0)
    return {"blocks": sum(blocks), "head": head, "per_block": per_block, "saved": blocks, "checkpointed": ckpt}


def measure_saved_bytes(fn, exclude=()) -> tuple[int, object]:
    """(bytes autograd saves for backward while fn() runs, fn's result): unique storages, leaving out those of
    `exclude` (parameters, inputs). The measurement the estimator's activation terms are tested against."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def max_micro_batch(cfg: IGPTConfig, budget_bytes: int, *, limit: int = 1 << 16, **kwargs) -> int:
    """Largest micro-batch whose estimated peak fits in `budget_bytes` (0 if not even one sequence fits).
    kwargs go to `estimate` (world_size, policy, ac, dtypes, workspace_bytes, ...)."""
    def fits(b):
        return estimate(cfg, b, **kwargs).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi); the estimate grows with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def table(presets, resolution: int, gpus: int, gpu_mem_gib: float, acs, batches, *, policy: str = "fsdp-bf16",
          workspace_gib: float = 3.0, objective: str = "ar") -> str:
    """The CLI's markdown table: GiB per GPU at each micro-batch and the largest micro-batch that fits."""
    budget = int(gpu_mem_gib * GiB)
    kw = dict(world_size=gpus, policy=policy, workspace_bytes=int(workspace_gib * GiB))
    head = ["model", "params", "AC", "state GiB", "saved GiB/sample"] + [f"mb={b}" for b in batches] + \
        ["max mb", f"global batch ({gpus} GPUs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in presets:
        cfg = IGPTConfig.preset(name, resolution=resolution, objective=objective)
        for ac in acs:
            one = estimate(cfg, 1, ac=ac, **kw)
            state = sum(one.state.values())
            saved = saved_activation_bytes(cfg, 1, ac=ac, **kw)
            cells = [name.upper(), f"{cfg.num_params() / 1e6:,.0f}M", ac, _gib(state),
                     f"{(saved['blocks'] + saved['head']) / GiB:.2f}"]
            for b in batches:
                t = estimate(cfg, b, ac=ac, **kw).total
                cells.append(_gib(t) + ("" if t <= budget else " ✗"))
            mb = max_micro_batch(cfg, budget, ac=ac, **kw)
            cells += [str(mb), str(mb * gpus)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = cli.parser(prog="python -m igpt.memory", description=(
        "Estimated peak memory per GPU of iGPT training (FSDP2, bf16 params/activations, fp32 master, grads and "
        "AdamW; see igpt/memory.py for the formula). An estimate, checked on CPU only."))
    ap.add_argument("--preset", nargs="+", default=["s", "m", "l"], help="presets")
    ap.add_argument("--resolution", type=int, default=48, help="image side; the context is its square")
    ap.add_argument("--gpus", type=int, default=8, help="FSDP world size")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU in GiB")
    ap.add_argument("--ac", nargs="+", default=["none", "full"], help="none | full | every-K")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64], help="micro-batches to show")
    ap.add_argument("--workspace-gib", type=float, default=3.0,
                    help="flat allowance for CUDA context, NCCL and fragmentation")
    ap.add_argument("--policy", default="fsdp-bf16", choices=sorted(POLICIES))
    ap.add_argument("--objective", default="ar", choices=["ar", "bert"])
    args = ap.parse_args(argv)
    if args.policy != "fsdp-bf16" and args.gpus != 1:
        ap.error(f"--policy {args.policy} does not shard: use --gpus 1")
    try:
        for ac in args.ac:
            checkpointed_blocks(ac, 1)
        text = table(args.preset, args.resolution, args.gpus, args.gpu_mem_gib, args.ac, args.batch,
                     policy=args.policy, workspace_gib=args.workspace_gib, objective=args.objective)
    except ValueError as e:
        ap.error(str(e))
    n = args.resolution ** 2
    print(f"Estimated peak memory per GPU (GiB) — iGPT {args.objective.upper()} at "
          f"{args.resolution}x{args.resolution} ({n} tokens), policy {args.policy}, {args.gpus} GPU(s), "
          f"{args.gpu_mem_gib:g} GiB each, workspace allowance {args.workspace_gib:g} GiB; ✗ = does not fit. "
          "An estimate, not a measurement.")
    print(text)
    return 0


if __name__ == "__main__":
    cli.run(main)
