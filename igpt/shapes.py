"""The embedded `shapes` dataset (no download, deterministic, any resolution).

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
comes from a counter-based hash of those integers (igpt.hashing) - so any slice can be generated on its own, e.g. one
shard per rank.
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

from igpt.hashing import check_int, mix64, slot_uniforms
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
# counter-based random numbers: uniform(seed, stream, index, slot), vectorised over indices


def _uniform(seed: int, stream: int, index: np.ndarray, n_slots: int) -> np.ndarray:
    """float64 [len(index), n_slots] uniform in [0, 1), a pure function of (seed, stream, index, slot). Keyed its own
    way (not hashing.key): every shapes image, and the tests' hashes of them, depend on these bits."""
    seed_key, stream_key = mix64(np.array([seed, stream], dtype=np.uint64))
    return slot_uniforms(mix64(mix64(seed_key ^ index.astype(np.uint64)) ^ stream_key), n_slots)


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
    n = check_int("n", n, 0)
    res = check_int("resolution", resolution, 8)
    seed = check_int("seed", seed, 0)
    start = check_int("start", start, 0)
    ss = check_int("antialias", antialias, 1)
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
        n = check_int("n", n, 0)
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

