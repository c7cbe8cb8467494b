"""Counter-based random numbers for the data modules: every draw is a pure function of integers (a seed, a stream,
an index), so any image, crop, mask or held-out row can be rebuilt alone, on any rank, after a resume. Also the
integer and index checks those functions' callers share."""
from __future__ import annotations

import numpy as np
import torch

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1
# Key streams, one per use, so the same (seed, index) never gives correlated numbers in two places.
STREAM_CROP, STREAM_HELD_OUT, STREAM_BERT, STREAM_PERM = 11, 12, 13, 14


def mix64(x):
    """The splitmix64 finaliser on a numpy uint64 scalar or array (wrapping arithmetic): a well-mixed hash of each."""
    with np.errstate(over="ignore"):
        z = x + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key(*parts: int) -> np.uint64:
    """One well-mixed 64-bit key from a tuple of integers."""
    h = np.uint64(0x243F6A8885A308D3)
    for p in parts:
        h = mix64(h ^ np.uint64(int(p) & _MASK64))
    return h


def slot_uniforms(base: np.ndarray, n_slots: int) -> np.ndarray:
    """float64 [len(base), n_slots] uniform in [0, 1): slot j of row i a hash of (base[i], j), 53 random bits each."""
    with np.errstate(over="ignore"):
        slots = np.arange(1, n_slots + 1, dtype=np.uint64) * GOLDEN
        bits = mix64(base[:, None] ^ slots[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def hash_uniform(k: np.uint64, index, n_slots: int) -> np.ndarray:
    """float64 [len(index), n_slots] uniform in [0, 1): a pure function of (key k, index, slot)."""
    return slot_uniforms(mix64(k ^ mix64(np.asarray(index, dtype=np.int64).astype(np.uint64))), n_slots)


def check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def as_index_array(indices, name: str = "indices") -> np.ndarray:
    """int64 numpy copy of a 1-D sequence or tensor of ints."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of ints, got shape {arr.shape} and dtype {arr.dtype}")
    return arr.astype(np.int64)
