"""Model configuration: one dataclass and the paper's presets."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

OBJECTIVES = ("ar", "bert")
MAX_HEAD_DIM = 256  # SDPA handles any head; the fused attention kernel takes <= 128 and says so (iGPT-XL: 192)

# Sizes from the paper's table (layers, width, heads). `tiny` is CI-sized: it trains on 2 CPU cores in minutes.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4),
    "s": dict(n_layer=24, n_embd=512, n_head=8),
    "m": dict(n_layer=36, n_embd=1024, n_head=8),
    "l": dict(n_layer=48, n_embd=1536, n_head=16),
    "xl": dict(n_layer=60, n_embd=3072, n_head=16),
}


@dataclass
class IGPTConfig:
    n_layer: int = 24
    n_embd: int = 512
    n_head: int = 8
    resolution: int = 32  # images are resolution x resolution; the context is resolution**2 tokens
    vocab_size: int = 512  # palette size (9-bit colour palette); the AR start token is a separate vector
    objective: str = "ar"  # "ar": next-token, causal; "bert": masked tokens, bidirectional
    bias: bool = False  # biases on the linear layers (the paper has none; converted HF checkpoints may)
    n_classes: int | None = None  # adds a classifier head on mean-pooled final features
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "resolution", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IGPTConfig.{name} must be a positive int, got {value!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"IGPTConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: pick n_head among "
                f"{[h for h in range(1, 65) if self.n_embd % h == 0]}"
            )
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"head dim n_embd/n_head = {self.head_dim} exceeds {MAX_HEAD_DIM}, the largest the attention kernel "
                f"supports: use at least n_head={math.ceil(self.n_embd / MAX_HEAD_DIM)}"
            )
        if self.n_classes is not None and (
            isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int) or self.n_classes < 2
        ):
            raise ValueError(f"n_classes must be None (no classifier) or an int >= 2, got {self.n_classes!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive float, got {self.norm_eps!r}")

    @property
    def n_ctx(self) -> int:
        return self.resolution * self.resolution

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def causal(self) -> bool:
        return self.objective == "ar"

    @classmethod
    def preset(cls, name: str, **overrides) -> "IGPTConfig":
        """`IGPTConfig.preset("s", resolution=48, objective="bert")`."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IGPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown IGPTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def num_params(self) -> int:
        """Parameter count of `Decoder(self)` (embeddings included)."""
        C, L, V = self.n_embd, self.n_layer, self.vocab_size
        per_block = 12 * C * C + 2 * C + (9 * C if self.bias else 0)
        heads = V * C + (self.n_classes * (C + 1) if self.n_classes else 0)
        return V * C + C + self.n_ctx * C + L * per_block + C + heads
