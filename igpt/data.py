"""Datasets for iGPT. This part: the embedded `shapes` dataset (no download, deterministic, any resolution).

`shapes` is the default dataset of the demo run: a tiny model pretrains on it in minutes on a CPU, then a linear probe
on its features has to beat a randomly initialised model. That comparison only means something if the classes cannot
be told apart by colour statistics, which a random network's mean-pooled features already expose. So:

  * every image is two flat colours, a foreground shape or texture on a background; the (background, foreground)
    pair is drawn uniformly from the 56 ordered pairs of distinct SHAPES_COLOURS (the 8 corners of the RGB cube),
    independently of the class;
  * the foreground covers a fraction f ~ U(0.2, 0.42) of the image, drawn independently of the class, and every
    class turns f into its own size parameters (disc radius, ring thickness, stripe duty cycle, ...), so the
    foreground-area distribution - what a colour histogram sees - is the same for all classes;
  * position, size, period and phase vary at random; what is left to tell the classes apart is shape and orientation.

Why only 8 colours: with colours drawn from all of RGB, every image brings two of the 512 palette tokens, and the
pooled features of a tiny model (width 128) are dominated by *which* two - a per-image random vector that swamps the
shape signal of every layer, pretrained or not (measured: both probe at chance, ~0.11, while the same models on
black-and-white renderings of the same images reach 0.85-0.90). With 8 colours the colour part of the features spans
few directions, which a linear probe can ignore, and the model learns to copy its 8 tokens in a few dozen steps and
spends the rest of its training on shape - what pretraining adds over a random network is then colour invariance.
The colours are 8 of the 512 colours of `shapes_palette()` (an 8x8x8 RGB grid), the fixed palette for this dataset:
k-means cannot fit 512 centres to 8 colours, and with the fixed palette every pixel quantizes exactly.

Image i of `make_shapes(n, resolution, seed, start)` is a pure function of (seed, start + i) - every random number
comes from a counter-based hash of those integers - so any slice can be generated on its own, e.g. one shard per rank.
Scenes live in continuous [0, 1)^2 coordinates and are rasterised at the target resolution (each pixel takes the colour
at its centre); the same index gives the same scene at every resolution.

Anti-aliasing (`antialias=k`: k x k supersampling) is available but off by default, because it leaks shape into colour
statistics: blended edge pixels add colours in proportion to edge length and by a class-typical pattern (a disc gets
~16 distinct colours at 32x32 with 4x4 supersampling, a square ~6, stripes ~4.5). With 2x2 supersampling a linear
classifier on colour-permutation-invariant histogram features reaches ~50% on 10 classes, against ~10% (chance)
without anti-aliasing (see tests/test_data.py).

Labels are balanced: every aligned block of len(SHAPES_CLASSES) consecutive indices holds each class exactly once, in a
seeded random order. At 16x16 about 1 stripe image in 20,000 renders blank (stripes thinner than a pixel that miss
every pixel centre); at 32x32 and above none in 10,000 does.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from igpt.palette import Palette

SHAPES_CLASSES = [
    "disc",          # filled circle
    "ring",          # annulus
    "square",        # filled axis-aligned square
    "frame",         # square outline
    "triangle",      # isosceles, apex up, base = height
    "cross",         # plus sign
    "h_stripes",     # horizontal stripes over the whole image
    "v_stripes",     # vertical stripes
    "d_stripes",     # diagonal stripes (45 degrees, rising to the right)
    "checkerboard",  # squares on alternate cells of a grid
]
N_CLASSES = len(SHAPES_CLASSES)

TEST_START = 1 << 31  # ShapesDataset(split="test") uses indices TEST_START + i: disjoint from any train range < 2^31

# Scene parameters (fractions of the image side unless noted).
AREA_RANGE = (0.2, 0.42)     # foreground fraction of the image, the same distribution for every class
MARGIN = 0.03                # closed shapes keep this far from the border
HOLE_RANGE = (0.35, 0.6)     # ring / frame: inner size / outer size
ARM_RANGE = (0.3, 0.42)      # cross: arm width / arm length
PERIOD_RANGE = (0.22, 0.36)  # stripes / checkerboard: period (cell size)

PALETTE_LEVELS = np.round(np.arange(8) * 255 / 7)  # shapes_palette(): every (r, g, b) of these levels, 512 colours
SHAPES_COLOURS = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.uint8)
# ^ background and foreground come from these 8 (the corners of the RGB cube, all in the palette), bg != fg

# Slots of the per-image random numbers (uniform in [0, 1)).
_AREA, _POS_X, _POS_Y, _AUX, _PERIOD, _PHASE_X, _PHASE_Y, _BG, _FG = 0, 1, 2, 3, 4, 5, 6, 7, 8
_N_SLOTS = 9


# ----------------------------------------------------------------------------------------------------------------
# counter-based random numbers: uniform(seed, index, slot), vectorised over indices


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic): a well-mixed hash of each element."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, stream: int, index: np.ndarray, n_slots: int) -> np.ndarray:
    """float64 [len(index), n_slots] uniform in [0, 1), a pure function of (seed, stream, index, slot)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed, stream], dtype=np.uint64))
        base = _splitmix64(_splitmix64(key[0] ^ index.astype(np.uint64)) ^ key[1])
        slots = np.arange(1, n_slots + 1, dtype=np.uint64) * _GOLDEN
        bits = _splitmix64(base[:, None] ^ slots[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def shapes_labels(n: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """int64 [n]: the labels of images start .. start + n - 1, without rendering them."""
    idx = start + np.arange(n, dtype=np.int64)
    block, pos = idx // N_CLASSES, idx % N_CLASSES
    perms = np.argsort(_uniform(seed, 1, block, N_CLASSES), axis=1, kind="stable")  # one permutation per block
    return torch.from_numpy(perms[np.arange(n), pos].astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# the classes: each maps the foreground fraction f (and its own random numbers) to a boolean mask on the sample grid


def _place(p: dict, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of a closed shape with half-extent `half`, uniform over the positions that keep it inside the margin."""
    free = (1 - 2 * MARGIN - 2 * half).clamp(min=0)
    return MARGIN + half + p["pos_x"] * free, MARGIN + half + p["pos_y"] * free


def _disc(x, y, p):
    r = torch.sqrt(p["f"] / math.pi)
    cx, cy = _place(p, r)
    return (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2


def _ring(x, y, p):
    q = _lerp(HOLE_RANGE, p["aux"])  # inner radius / outer radius
    r_out = torch.sqrt(p["f"] / (math.pi * (1 - q ** 2)))
    cx, cy = _place(p, r_out)
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    return (d2 <= r_out ** 2) & (d2 >= (q * r_out) ** 2)


def _square(x, y, p):
    half = torch.sqrt(p["f"]) / 2
    cx, cy = _place(p, half)
    return torch.maximum((x - cx).abs(), (y - cy).abs()) <= half


def _frame(x, y, p):
    q = _lerp(HOLE_RANGE, p["aux"])  # inner side / outer side
    half = torch.sqrt(p["f"] / (1 - q ** 2)) / 2
    cx, cy = _place(p, half)
    m = torch.maximum((x - cx).abs(), (y - cy).abs())
    return (m <= half) & (m >= q * half)


def _triangle(x, y, p):
    side = torch.sqrt(2 * p["f"])  # base = height = side: area side^2 / 2
    cx, cy = _place(p, side / 2)
    top = cy - side / 2
    return (y <= cy + side / 2) & ((x - cx).abs() <= (y - top) / 2)


def _cross(x, y, p):
    t = _lerp(ARM_RANGE, p["aux"])  # arm width / arm length
    length = torch.sqrt(p["f"] / (2 * t - t ** 2))  # area = 2 * w * L - w^2 with w = t * L
    cx, cy = _place(p, length / 2)
    dx, dy = (x - cx).abs(), (y - cy).abs()
    w, half = t * length / 2, length / 2
    return ((dx <= half) & (dy <= w)) | ((dx <= w) & (dy <= half))


def _stripes(u, p):
    """Stripes across coordinate u with duty cycle f: the foreground fraction is f for any period and phase."""
    return torch.frac(u / p["period"] + p["phase_x"]) < p["f"]


def _h_stripes(x, y, p):
    return _stripes(y, p)


def _v_stripes(x, y, p):
    return _stripes(x, p)


def _d_stripes(x, y, p):
    return _stripes((x + y) * (0.5 ** 0.5), p)


def _checkerboard(x, y, p):
    a, b = x / p["period"] + p["phase_x"], y / p["period"] + p["phase_y"]
    ia, ib = torch.floor(a), torch.floor(b)
    half = torch.sqrt(2 * p["f"]) / 2  # squares of side sqrt(2 f) cells on half of the cells: area f
    on = torch.remainder(ia + ib, 2) == 0
    return on & ((a - ia - 0.5).abs() <= half) & ((b - ib - 0.5).abs() <= half)


_MASKS = [_disc, _ring, _square, _frame, _triangle, _cross, _h_stripes, _v_stripes, _d_stripes, _checkerboard]
assert len(_MASKS) == N_CLASSES


def _lerp(bounds: tuple[float, float], u):
    return bounds[0] + (bounds[1] - bounds[0]) * u


# ----------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _colours(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours (float64 [n, 3], integer values 0..255) from the per-image numbers:
    a uniform ordered pair of distinct SHAPES_COLOURS. Neither depends on the class."""
    k = len(SHAPES_COLOURS)
    ib = np.minimum(np.floor(u[:, _BG] * k), k - 1).astype(np.int64)
    jf = (ib + 1 + np.minimum(np.floor(u[:, _FG] * (k - 1)), k - 2).astype(np.int64)) % k
    colours = SHAPES_COLOURS.astype(np.float64)
    return colours[ib], colours[jf]


def shapes_palette():
    """The fixed 512-colour palette of the shapes dataset: the 8x8x8 grid of PALETTE_LEVELS (0, 36, 73, ..., 255)
    in every channel, so SHAPES_COLOURS quantize exactly. Train on shapes with it: k-means needs >= 512 distinct
    colours and the dataset has 8."""
    grid = np.stack(np.meshgrid(PALETTE_LEVELS, PALETTE_LEVELS, PALETTE_LEVELS, indexing="ij"), -1).reshape(-1, 3)
    return Palette(torch.from_numpy(grid / 127.5 - 1).float())


def make_shapes(n: int, resolution: int = 32, seed: int = 0, start: int = 0,
                antialias: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Render images start .. start + n - 1 of the shapes dataset.

    Returns (images uint8 [n, resolution, resolution, 3], labels int64 [n]); classes are SHAPES_CLASSES.
    antialias: samples per pixel along each axis; 1 (default) = the pixel centre decides and every image holds
    exactly two colours. > 1 smooths edges but makes colour statistics class-dependent (see the module docstring).
    """
    n = _check_int("n", n, 0)
    res = _check_int("resolution", resolution, 8)
    seed = _check_int("seed", seed, 0)
    start = _check_int("start", start, 0)
    ss = _check_int("antialias", antialias, 1)
    if seed >= 1 << 63 or start + n > 1 << 62:
        raise ValueError(f"seed must be < 2^63 and start + n <= 2^62, got seed={seed}, start + n={start + n}")

    labels = shapes_labels(n, seed, start)
    u = _uniform(seed, 0, start + np.arange(n, dtype=np.int64), _N_SLOTS)
    bg, fg = _colours(u)
    params = {  # float32 [n, 1, 1] each, broadcasting against the [1, S, S] sample grid
        "f": _lerp(AREA_RANGE, u[:, _AREA]), "pos_x": u[:, _POS_X], "pos_y": u[:, _POS_Y], "aux": u[:, _AUX],
        "period": _lerp(PERIOD_RANGE, u[:, _PERIOD]), "phase_x": u[:, _PHASE_X], "phase_y": u[:, _PHASE_Y],
    }
    params = {k: torch.from_numpy(v.astype(np.float32)).view(n, 1, 1) for k, v in params.items()}

    side = res * ss  # sample grid: side x side points at the centres of the sub-pixels
    coord = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    x, y = coord.view(1, 1, side), coord.view(1, side, 1)

    coverage = torch.empty(n, res, res, dtype=torch.float32)
    chunk = max(1, (1 << 22) // (side * side))  # images per step: bounds the [chunk, side, side] masks in memory
    for c, mask_fn in enumerate(_MASKS):  # each class renders its own images
        idx = (labels == c).nonzero().flatten()
        for s in range(0, len(idx), chunk):
            sel = idx[s:s + chunk]
            mask = mask_fn(x, y, {k: v[sel] for k, v in params.items()})
            mask = mask.expand(len(sel), side, side).to(torch.float32)
            coverage[sel] = mask.view(len(sel), res, ss, res, ss).mean(dim=(2, 4))

    bg_t = torch.from_numpy(bg.astype(np.float32)).view(n, 1, 1, 3)
    fg_t = torch.from_numpy(fg.astype(np.float32)).view(n, 1, 1, 3)
    images = bg_t + coverage.unsqueeze(-1) * (fg_t - bg_t)
    return images.round_().clamp_(0, 255).to(torch.uint8), labels


class ShapesDataset(Dataset):
    """`n` shapes images held in memory; items are (uint8 [R, R, 3] tensor, int label).

    split "train" uses indices 0 .. n - 1, "test" uses TEST_START + (0 .. n - 1): disjoint for any n < 2^31.
    """

    classes = SHAPES_CLASSES

    def __init__(self, n: int, resolution: int = 32, seed: int = 0, split: str = "train", antialias: int = 1):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        n = _check_int("n", n, 0)
        if n > TEST_START:
            raise ValueError(f"n must be <= {TEST_START} so train and test indices stay disjoint, got {n}")
        self.split, self.resolution, self.seed = split, resolution, seed
        self.images, self.labels = make_shapes(n, resolution, seed, 0 if split == "train" else TEST_START, antialias)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return f"ShapesDataset(n={len(self)}, resolution={self.resolution}, seed={self.seed}, split={self.split!r})"


# ================================================================================================================
# Dataset sources and a data order that does not depend on the number of ranks
#
#   src = open_source("shapes" | "imagefolder:DIR" | DIR | HUB_ID, "train" | "test", resolution, seed=...)
#   images, labels = src.get(indices, train=True, epoch=e)    # uint8 [n, R, R, 3], int64 [n] (or None)
#   idx, epoch = global_batch_indices(step, global_batch, len(src), seed)   # the same for any world size
#   local = rank_slice(idx, rank, world_size)                 # this rank's contiguous part of the global batch
#   mask = bert_mask_for(local, step, seq_len, seed)          # a pure function of (seed, sample index, step)
#   for step, images, labels, local in BatchLoader(src, global_batch, rank=r, world_size=w).iterate(s0, s1): ...
#
# Every random choice here (crop offsets, the held-out slice, BERT masks) comes from a counter-based hash of integers,
# and each epoch's permutation from a torch.Generator seeded by a hash of (seed, epoch), so any batch of any step can
# be rebuilt after a resume, by any number of ranks. Hugging Face `datasets` is imported lazily (only by open_source).

import io
import os
from collections.abc import Sequence
from functools import lru_cache

HELD_OUT_FRACTION = 0.05  # share of a train-only dataset carved out as its test split (at least 1 image)
_HELD_OUT_KEY = 0x5EED    # the carve does not depend on the run's seed: every run and the probe see the same split
_LABEL_NAMES = ("label", "labels", "fine_label")
_LOCAL_HINT = ("to use a local copy pass --dataset imagefolder:DIR (folders of images per class) "
               "or --dataset DIR (a datasets.save_to_disk directory)")

# hash streams (one per use, so the same (seed, index) never gives correlated numbers in two places)
_S_CROP, _S_HELD_OUT, _S_BERT, _S_PERM = 11, 12, 13, 14
_MASK64 = (1 << 64) - 1


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is missing, unreachable or not in a format we read; the message says how to point at a local
    copy."""


def _mix64(x):
    """splitmix64 finaliser on a numpy uint64 scalar or array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    """One well-mixed 64-bit key from a tuple of integers."""
    h = np.uint64(0x243F6A8885A308D3)
    for p in parts:
        h = _mix64(h ^ np.uint64(int(p) & _MASK64))
    return h


def _hash_uniform(key: np.uint64, index: np.ndarray, n_slots: int) -> np.ndarray:
    """float64 [len(index), n_slots] uniform in [0, 1): a pure function of (key, index, slot)."""
    with np.errstate(over="ignore"):
        base = _mix64(key ^ _mix64(np.asarray(index, dtype=np.int64).astype(np.uint64)))
        slots = np.arange(1, n_slots + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        bits = _mix64(base[:, None] ^ slots[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _as_index_array(indices, name: str = "indices") -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of ints, got shape {arr.shape} and dtype {arr.dtype}")
    return arr.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# image pipeline: RGB -> area resize (shorter side = R) -> R x R crop (random for training, centre for evaluation)


def _to_pil(x):
    from PIL import Image

    if isinstance(x, Image.Image):
        return x
    if isinstance(x, dict) and (x.get("bytes") is not None or x.get("path")):  # an undecoded datasets.Image value
        return Image.open(io.BytesIO(x["bytes"])) if x.get("bytes") is not None else Image.open(x["path"])
    if isinstance(x, (np.ndarray, torch.Tensor)):
        arr = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise TypeError(f"image arrays must be uint8 [H, W], [H, W, 1|3|4], got {arr.dtype} {arr.shape}")
        return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    raise TypeError(f"cannot read an image from a {type(x).__name__}; the image column must hold images "
                    "(datasets.Image) or uint8 arrays")


def resize_crop(image, resolution: int, crop_u: tuple[float, float] | None = None) -> np.ndarray:
    """One image (PIL image or uint8 array) -> uint8 [R, R, 3] RGB.

    The shorter side is resized to R with area (box) interpolation - every output pixel is the average of the input
    area it covers, so downsampling is antialiased (upsampling repeats pixels); the other side keeps the aspect ratio.
    Then an R x R crop: centred when crop_u is None, else at fraction crop_u = (u_x, u_y) in [0, 1) of the free range.
    """
    from PIL import Image

    img = _to_pil(image)
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else img.mode).convert("RGB")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image of size {w}x{h}")
    R = resolution
    if w <= h:
        nw, nh = R, max(R, round(h * R / w))
    else:
        nw, nh = max(R, round(w * R / h)), R
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BOX)
    if crop_u is None:
        ox, oy = (nw - R) // 2, (nh - R) // 2
    else:
        ox = min(int(crop_u[0] * (nw - R + 1)), nw - R)
        oy = min(int(crop_u[1] * (nh - R + 1)), nh - R)
    if (nw, nh) != (R, R):
        img = img.crop((ox, oy, ox + R, oy + R))
    return np.array(img, dtype=np.uint8).reshape(R, R, 3)


# ----------------------------------------------------------------------------------------------------------------
# sources


class ImageSource:
    """A split of an image dataset, indexed lazily: `get(indices)` decodes only the images asked for.

    name: the --dataset spec; split: "train" | "test"; resolution: R; n_classes: number of classes, None without
    a label column; class_names: list of names where the dataset has them, else None.
    """

    name: str
    split: str
    resolution: int
    n_classes: int | None
    class_names: list[str] | None = None
    seed: int = 0
    note: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: Sequence[int], *, train: bool, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [n, R, R, 3] RGB and int64 labels [n] (or None). train=True: random crops drawn from
        (seed, epoch, sample index); train=False: centre crops."""
        idx = _as_index_array(indices)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must lie in 0..{len(self) - 1} for {self!r}, "
                             f"got values in {idx.min()}..{idx.max()}")
        crop_u = _hash_uniform(_key(_S_CROP, self.seed, epoch), idx, 2) if train else None
        return self._get(idx, crop_u)

    def _get(self, idx: np.ndarray, crop_u: np.ndarray | None):
        raise NotImplementedError

    def labels(self) -> torch.Tensor | None:
        """int64 [len(self)]: every label of the split (None without a label column)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        note = f", {self.note}" if self.note else ""
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"resolution={self.resolution}, n_classes={self.n_classes}{note})")


class ShapesSource(ImageSource):
    """The embedded shapes dataset: image i of the train split is make_shapes index i, of the test split
    TEST_START + i. Rendered on demand at the resolution (no crop needed; `train` changes nothing)."""

    def __init__(self, split: str, resolution: int, *, seed: int = 0, size: int = 1 << 20):
        if resolution < 8:
            raise ValueError(f"the shapes dataset renders at resolution >= 8, got {resolution}")
        size = _check_int("shapes_size", size, 1)
        if size > TEST_START:
            raise ValueError(f"shapes_size must be <= {TEST_START} so train and test stay disjoint, got {size}")
        self.name, self.split, self.resolution, self.seed, self.size = "shapes", split, resolution, seed, size
        self.n_classes, self.class_names = N_CLASSES, list(SHAPES_CLASSES)
        self.start = 0 if split == "train" else TEST_START
        self.note = f"seed={seed}, indices {self.start}..{self.start + size - 1}"
        self._labels = None

    def __len__(self) -> int:
        return self.size

    def _get(self, idx, crop_u):
        R = self.resolution
        images = torch.empty(len(idx), R, R, 3, dtype=torch.uint8)
        labels = torch.empty(len(idx), dtype=torch.int64)
        i = 0
        while i < len(idx):  # render runs of consecutive indices together
            j = i + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            images[i:j], labels[i:j] = make_shapes(j - i, R, self.seed, self.start + int(idx[i]))
            i = j
        return images, labels

    def labels(self) -> torch.Tensor:
        if self._labels is None:
            self._labels = shapes_labels(self.size, self.seed, self.start)
        return self._labels


class HFSource(ImageSource):
    """A split of a Hugging Face `datasets.Dataset`; rows are decoded on demand (in DataLoader workers when used
    through BatchLoader). `rows` maps source index -> dataset row (None: identity), for carved splits."""

    def __init__(self, name: str, split: str, resolution: int, dataset, *, seed: int = 0, image_column: str,
                 label_column: str | None, n_classes: int | None, class_names: list[str] | None,
                 rows: np.ndarray | None = None, note: str = ""):
        self.name, self.split, self.resolution, self.seed = name, split, resolution, seed
        self.image_column, self.label_column = image_column, label_column
        self.n_classes, self.class_names, self.rows, self.note = n_classes, class_names, rows, note
        self.dataset = dataset.select_columns([image_column] + ([label_column] if label_column else []))

    def __len__(self) -> int:
        return len(self.dataset) if self.rows is None else len(self.rows)

    def _get(self, idx, crop_u):
        R = self.resolution
        images = torch.empty(len(idx), R, R, 3, dtype=torch.uint8)
        if len(idx) == 0:
            return images, (torch.zeros(0, dtype=torch.int64) if self.label_column else None)
        rows = idx if self.rows is None else self.rows[idx]
        batch = self.dataset[[int(r) for r in rows]]
        for k, image in enumerate(batch[self.image_column]):
            u = None if crop_u is None else (float(crop_u[k, 0]), float(crop_u[k, 1]))
            images[k] = torch.from_numpy(resize_crop(image, R, u))
        labels = None
        if self.label_column:
            labels = torch.tensor([int(v) for v in batch[self.label_column]], dtype=torch.int64).view(len(idx))
        return images, labels

    def labels(self) -> torch.Tensor | None:
        if not self.label_column:
            return None
        col = _column_numpy(self.dataset, self.label_column)
        return torch.from_numpy((col if self.rows is None else col[self.rows]).astype(np.int64))


def _column_numpy(ds, column: str) -> np.ndarray:
    """One column of a datasets.Dataset as a numpy array, read through Arrow (no Python objects per row)."""
    return np.asarray(ds.select_columns([column]).with_format("numpy")[:][column])


def _detect_columns(features, name: str, image_column, label_column):
    import datasets

    cols = list(features)
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"--image-column {image_column!r} is not a column of {name} (columns: {cols})")
    else:
        image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            raise ValueError(f"{name} has no image column (a datasets.Image feature) among its columns {cols}; "
                             "name the column that holds the images with --image-column COLUMN")
    if label_column is not None:
        if label_column not in features:
            raise ValueError(f"--label-column {label_column!r} is not a column of {name} (columns: {cols})")
    else:
        label_column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        if label_column is None:
            label_column = next((c for c in _LABEL_NAMES if isinstance(features.get(c), datasets.Value)
                                 and features[c].dtype.startswith(("int", "uint"))), None)
    return image_column, label_column


def _held_out_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic pseudo-random held-out slice of rows 0..n-1 (HELD_OUT_FRACTION, at least 1): (train, test),
    both sorted. Random rather than the last rows: datasets are often sorted by class (imagefolder is)."""
    if n < 2:
        raise ValueError(f"the dataset has {n} image(s) and no test or validation split: at least 2 are needed to "
                         "hold one out for testing")
    k = max(1, round(HELD_OUT_FRACTION * n))
    u = _hash_uniform(_key(_S_HELD_OUT, _HELD_OUT_KEY), np.arange(n), 1)[:, 0]
    test = np.sort(np.argpartition(u, k - 1)[:k]) if k < n else np.arange(n)
    keep = np.ones(n, dtype=bool)
    keep[test] = False
    return np.nonzero(keep)[0].astype(np.int64), test.astype(np.int64)


def _hf_source(name: str, dsdict: dict, split: str, resolution: int, seed: int, image_column, label_column):
    """Pick the split of a {split name: Dataset} dict (test -> validation -> carved from train) and wrap it."""
    import datasets

    names = list(dsdict)
    if not names:
        raise DatasetUnavailableError(f"{name} holds no split; {_LOCAL_HINT}")
    only = names[0] if len(names) == 1 and names[0] not in ("test", "validation") else None
    train_name = "train" if "train" in dsdict else only  # a lone split of another name counts as train
    test_name = next((s for s in ("test", "validation") if s in dsdict), None)
    base = train_name if split == "train" or test_name is None else test_name
    if base is None:
        wanted = "'train'" if split == "train" else "'test', 'validation' or 'train'"
        raise ValueError(f"{name} has no {wanted} split (its splits: {names})")
    ds = dsdict[base]
    image_column, label_column = _detect_columns(ds.features, name, image_column, label_column)
    rows, note = None, ""
    if test_name is None:  # carve a fixed held-out slice out of the train split
        train_rows, test_rows = _held_out_rows(len(ds))
        rows = train_rows if split == "train" else test_rows
        note = (f"'{base}' split minus a held-out {HELD_OUT_FRACTION:.0%}" if split == "train" else
                f"held-out {HELD_OUT_FRACTION:.0%} of the '{base}' split") + " (no test or validation split)"
    elif split == "test" and test_name != "test":
        note = f"'{test_name}' split (no test split)"
    n_classes = class_names = None
    if label_column:
        feat = ds.features[label_column]
        if isinstance(feat, datasets.ClassLabel):
            n_classes, class_names = feat.num_classes, list(feat.names)
        else:  # plain ints: the largest label over every split + 1
            top = [int(_column_numpy(d, label_column).max()) for d in dsdict.values()
                   if len(d) and label_column in d.features]
            n_classes = max(top) + 1 if top else None
    return HFSource(name, split, resolution, ds, seed=seed, image_column=image_column, label_column=label_column,
                    n_classes=n_classes, class_names=class_names, rows=rows, note=note)


def _has_image_file(root: str) -> bool:
    from PIL import Image

    Image.init()
    exts = {e.lower() for e in Image.registered_extensions()}
    for _, _, files in os.walk(root):
        if any(os.path.splitext(f)[1].lower() in exts for f in files):
            return True
    return False


def open_source(spec: str, split: str, resolution: int, *, seed: int = 0, image_column: str | None = None,
                label_column: str | None = None, shapes_size: int = 1 << 20,
                cache_dir: str | None = None) -> ImageSource:
    """Open one split of a dataset.

    spec: "shapes" (embedded, no download) | "imagefolder:DIR" (DIR/CLASS/*.png, optionally under DIR/train, DIR/test)
    | DIR (a datasets.save_to_disk directory: DatasetDict or Dataset) | a Hugging Face Hub id.
    split: "train" | "test"; a dataset without a test split uses "validation", else a fixed held-out 5% of train
    (disjoint from what split="train" then returns; see repr). seed: the shapes dataset's seed and the random-crop
    seed. shapes_size: images in each shapes split. cache_dir: the datasets cache (imagefolder and hub ids).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    resolution = _check_int("resolution", resolution, 1)
    seed = _check_int("seed", seed, 0)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset must be 'shapes', 'imagefolder:DIR', a directory or a hub id, got {spec!r}")
    if spec == "shapes":
        return ShapesSource(split, resolution, seed=seed, size=shapes_size)

    import datasets

    if spec.startswith("imagefolder:"):
        root = os.path.expanduser(spec[len("imagefolder:"):])
        if not os.path.isdir(root):
            raise DatasetUnavailableError(f"--dataset {spec}: no such directory {root!r}; imagefolder:DIR expects "
                                          "DIR/CLASS/IMAGE files (optionally under DIR/train and DIR/test)")
        if not _has_image_file(root):
            raise DatasetUnavailableError(f"--dataset {spec}: {root!r} contains no image files; imagefolder:DIR "
                                          "expects DIR/CLASS/IMAGE files (optionally under DIR/train and DIR/test)")
        try:
            dsdict = datasets.load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
        except Exception as e:
            raise DatasetUnavailableError(f"--dataset {spec}: the image folder could not be read "
                                          f"({type(e).__name__}: {e})") from e
        return _hf_source(spec, dict(dsdict), split, resolution, seed, image_column, label_column)

    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DatasetUnavailableError(
                f"--dataset {spec}: {path!r} is not a datasets.save_to_disk directory (no dataset_dict.json or "
                f"dataset_info.json/state.json); for folders of images per class pass --dataset imagefolder:{spec}"
            ) from e
        dsdict = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return _hf_source(spec, dsdict, split, resolution, seed, image_column, label_column)
    if os.path.exists(path):
        raise DatasetUnavailableError(f"--dataset {spec}: {path!r} is a file, not a directory; {_LOCAL_HINT}")

    try:
        dsdict = datasets.load_dataset(spec, cache_dir=cache_dir)
    except Exception as e:  # offline, unreachable, not found, gated, ...: one clear message
        raise DatasetUnavailableError(f"dataset {spec!r} could not be loaded from the Hugging Face Hub "
                                      f"({type(e).__name__}: {e}); {_LOCAL_HINT}") from e
    return _hf_source(spec, dict(dsdict), split, resolution, seed, image_column, label_column)


# ----------------------------------------------------------------------------------------------------------------
# data order: one global permutation per epoch, batches in order, each rank takes its contiguous slice


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(_key(_S_PERM, seed, epoch)) & ((1 << 63) - 1))
    return torch.randperm(n, generator=g)


def global_batch_indices(step: int, global_batch: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """(int64 [global_batch] sample indices of global batch `step`, its epoch). Independent of the world size.

    Epoch e is one permutation of range(n) from a torch.Generator seeded by a hash of (seed, e); it yields
    n // global_batch batches in order and its last partial batch is dropped (those samples come back at random
    places in later epochs), so step s is batch s % (n // global_batch) of epoch s // (n // global_batch).
    """
    step = _check_int("step", step, 0)
    global_batch = _check_int("global_batch", global_batch, 1)
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the dataset has {n} images, fewer than one global batch of {global_batch}; "
                         "lower --batch-size or use a larger dataset")
    epoch, b = divmod(step, per_epoch)
    return _epoch_permutation(n, seed, epoch)[b * global_batch:(b + 1) * global_batch].clone(), epoch


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch: indices[rank * B/W : (rank + 1) * B/W]."""
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
    if len(indices) % world_size:
        raise ValueError(f"the global batch ({len(indices)}) must be divisible by the world size ({world_size}); "
                         "pick --batch-size as a multiple of the number of processes")
    per = len(indices) // world_size
    return indices[rank * per:(rank + 1) * per]


def bert_mask_for(sample_indices, step: int, seq_len: int, seed: int, rate: float = 0.15) -> torch.Tensor:
    """bool [n, seq_len], True = masked: each token independently with probability `rate` (as random_bert_mask),
    from a hash of (seed, step, sample index, position) - the same whichever rank holds the sample."""
    idx = _as_index_array(sample_indices, "sample_indices")
    step = _check_int("step", step, 0)
    seq_len = _check_int("seq_len", seq_len, 1)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    u = _hash_uniform(_key(_S_BERT, _check_int("seed", seed, 0), step), idx, seq_len)
    return torch.from_numpy(u < rate)


# ----------------------------------------------------------------------------------------------------------------
# the loader


def _keep(item):
    return item


class _Steps(Dataset):
    """Item `step` is the whole local batch of that step (DataLoader with batch_size=None and steps as indices)."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int):
        return (step, *self.loader.batch(step))


class BatchLoader:
    """Local batches of a rank, from any start step: step s holds rank_slice(global_batch_indices(s, ...)).

    num_workers > 0 decodes in DataLoader worker processes (prefetching prefetch_factor steps each); 0 decodes in
    this process. train=True: random crops (from (source seed, epoch, sample index)); False: centre crops.
    """

    def __init__(self, source: ImageSource, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, train: bool = True, prefetch_factor: int = 2):
        self.source, self.train = source, train
        self.global_batch = _check_int("global_batch", global_batch, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        self.seed = _check_int("seed", seed, 0)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.prefetch_factor = _check_int("prefetch_factor", prefetch_factor, 1)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size = {self.world_size}, got {self.rank}")
        if self.global_batch % self.world_size:
            raise ValueError(f"the global batch ({self.global_batch}) must be divisible by the world size "
                             f"({self.world_size}); pick --batch-size as a multiple of the number of processes")
        if len(source) < self.global_batch:
            raise ValueError(f"{source!r} has {len(source)} images, fewer than one global batch of "
                             f"{self.global_batch}; lower --batch-size")
        self.local_batch = self.global_batch // self.world_size
        self.steps_per_epoch = len(source) // self.global_batch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(images uint8 [b, R, R, 3], labels int64 [b] or None, sample indices int64 [b]) of this rank at `step`."""
        idx, epoch = global_batch_indices(step, self.global_batch, len(self.source), self.seed)
        local = rank_slice(idx, self.rank, self.world_size)
        images, labels = self.source.get(local, train=self.train, epoch=epoch)
        return images, labels, local

    def iterate(self, start_step: int, end_step: int):
        """Yields (step, images, labels, indices) for start_step <= step < end_step, in order."""
        start_step = _check_int("start_step", start_step, 0)
        end_step = _check_int("end_step", end_step, start_step)
        if self.num_workers == 0:
            for step in range(start_step, end_step):
                yield (step, *self.batch(step))
            return
        loader = torch.utils.data.DataLoader(
            _Steps(self), batch_size=None, sampler=range(start_step, end_step), num_workers=self.num_workers,
            collate_fn=_keep, prefetch_factor=self.prefetch_factor)
        yield from loader
