"""The 9-bit colour palette of iGPT: k-means centres in [-1, 1], quantize (RGB -> id) and decode (id -> RGB).

iGPT does not model raw 24-bit pixels: it clusters RGB values scaled to [-1, 1] (``x / 127.5 - 1``) into K = 512
colours with k-means and models the sequence of cluster ids. This file holds that palette:

    pal = Palette.fit(pixels, n_clusters=512, seed=0)   # k-means in torch, batched, CPU or CUDA
    ids = pal.quantize(pixels)                           # uint8 [..., 3] -> int64 [...]
    rgb = pal.decode(ids)                                # int64 [...]    -> uint8 [..., 3]
    pal.save("palette.npy"); pal = Palette.load("palette.npy")   # also .safetensors (key "centres")
    pal = Palette.from_hf(processor.clusters)            # the HF ImageGPTImageProcessor palette

The quantize rule is exact and is the oracle of the fused Triton embedding kernel:

    ids = argmin_j  (r - c_j0)^2 + (g - c_j1)^2 + (b - c_j2)^2,   ties -> lowest j,

all in fp32, where (r, g, b) = fl(fl(x / 127.5) - 1) (IEEE division, then subtraction, each rounded to fp32), each
square is rounded on its own, and the three terms are added left to right (no fused multiply-add). It is computed per
channel, never through the expanded form ||x||^2 - 2 x.c + ||c||^2, which rounds differently and flips ties and
near-ties. The 256 possible values of (r, g, b) are precomputed on the CPU (``PIXEL_TO_UNIT``), so the rule holds
bit for bit on every device (CUDA turns division by a scalar into a multiplication by its reciprocal).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import torch

# fl(fl(x / 127.5) - 1) for every uint8 x, computed with IEEE fp32 division: the pixel -> [-1, 1] map of the rule.
PIXEL_TO_UNIT = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0))

# Elements of the [chunk, K] distance matrix computed at once: small on the CPU so it stays in cache, large on GPUs.
_CPU_CHUNK_ELEMS = 1 << 19
_CUDA_CHUNK_ELEMS = 1 << 24
# Centres may exceed [-1, 1] by this much (floating-point rounding in files written by other tools).
_RANGE_TOL = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# input checks and the shared nearest-centre search


def _as_pixel_tensor(pixels, name: str = "pixels") -> torch.Tensor:
    """uint8 [..., 3] torch tensor or numpy array -> torch tensor (numpy input shares memory where it can)."""
    if isinstance(pixels, np.ndarray):
        if pixels.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8 RGB values in 0..255, got numpy dtype {pixels.dtype}; "
                            f"convert with .astype(np.uint8) after rounding and clipping to 0..255")
        if not pixels.flags.writeable:
            pixels = pixels.copy()  # torch.from_numpy warns on read-only arrays
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{name} must be a uint8 torch.Tensor or numpy.ndarray of shape [..., 3], "
                        f"got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 RGB values in 0..255, got {pixels.dtype}; "
                        f"convert with .round().clamp(0, 255).to(torch.uint8)")
    if pixels.dim() < 1 or pixels.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [..., 3] (RGB in the last dimension), got {tuple(pixels.shape)}; "
                         f"move the channel axis last, e.g. x.permute(0, 2, 3, 1) for [B, 3, H, W]")
    return pixels


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3] -> fp32 [..., 3] in [-1, 1], bit-exact fl(fl(x / 127.5) - 1) on any device."""
    return PIXEL_TO_UNIT.to(pixels.device)[pixels.long()]


def _default_chunk(device: torch.device, n_clusters: int) -> int:
    elems = _CUDA_CHUNK_ELEMS if device.type == "cuda" else _CPU_CHUNK_ELEMS
    return max(1, elems // n_clusters)


def _centre_columns(centres: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fp32 [K, 3] -> 3 contiguous [1, K] columns. Made outside torch.compile: torch 2.11's Inductor fused strided
    column views of a captured centres tensor with the pixel-table gather into wrong ids (fixed in 2.13)."""
    return tuple(centres[:, i].contiguous().unsqueeze(0) for i in range(3))


def _nearest(x: torch.Tensor, columns: tuple[torch.Tensor, ...], chunk_size: int | None = None):
    """Nearest centre of every row of x under the exact rule (see the module docstring).

    x: fp32 [N, 3], columns: `_centre_columns` of the fp32 [K, 3] centres, on x's device. Returns (ids int64 [N],
    squared distance fp32 [N]). Only a [chunk_size, K] block of distances exists at any time.
    """
    c = columns
    n, k = x.shape[0], c[0].shape[1]
    chunk = chunk_size or _default_chunk(x.device, k)
    ids = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    buf_d = torch.empty(min(chunk, n), k, dtype=torch.float32, device=x.device)
    buf_t = torch.empty_like(buf_d)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        d, t = buf_d[: e - s], buf_t[: e - s]
        # ((r - c0)^2 + (g - c1)^2) + (b - c2)^2, every square and sum rounded to fp32 separately.
        torch.sub(x[s:e, 0:1], c[0], out=d)
        d.mul_(d)
        for i in (1, 2):
            torch.sub(x[s:e, i:i + 1], c[i], out=t)
            t.mul_(t)
            d.add_(t)
        torch.min(d, dim=1, out=(dist[s:e], ids[s:e]))  # first index of the minimum: ties -> lowest j
    return ids, dist


def _check_centres(centres, source: str = "centres") -> torch.Tensor:
    """Validate and convert centres to an fp32 [K, 3] tensor; `source` names where they came from in errors."""
    if isinstance(centres, torch.Tensor):
        c = centres.detach()
    else:
        try:
            arr = np.asarray(centres)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{source}: expected an array-like of shape [K, 3] ({err})") from None
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"{source}: expected a float array-like of shape [K, 3], got {type(centres).__name__} "
                            f"of dtype {arr.dtype}")
        c = torch.from_numpy(np.ascontiguousarray(arr))
    if not c.is_floating_point():
        raise TypeError(f"{source}: expected floating-point centres in [-1, 1], got dtype {c.dtype}; "
                        f"centres are RGB / 127.5 - 1, not uint8 colours")
    if c.dim() != 2 or c.shape[1] != 3 or c.shape[0] < 1:
        raise ValueError(f"{source}: expected centres of shape [K, 3] with K >= 1 (512 for iGPT), "
                         f"got {tuple(c.shape)}")
    c = c.to(torch.float32).contiguous()
    if not torch.isfinite(c).all():
        raise ValueError(f"{source}: centres contain NaN or inf; expected finite values in [-1, 1]")
    worst = c.abs().max().item()
    if worst > 1.0 + _RANGE_TOL:
        raise ValueError(f"{source}: centres must lie in [-1, 1] (RGB scaled by x / 127.5 - 1), "
                         f"found |c| = {worst:.4g}; if they are 0..255 colours, pass colours / 127.5 - 1")
    return c


# ----------------------------------------------------------------------------------------------------------------


class Palette:
    """K colour centres in [-1, 1] (fp32 [K, 3]); token id j <-> centre j."""

    def __init__(self, centres):
        self.centres = _check_centres(centres)
        self._columns = _centre_columns(self.centres)  # what quantize searches (see _centre_columns)

    # --- basics -----------------------------------------------------------------------------------------------

    @property
    def n_clusters(self) -> int:
        return self.centres.shape[0]

    def __len__(self) -> int:
        return self.n_clusters

    @property
    def device(self) -> torch.device:
        return self.centres.device

    def to(self, device) -> "Palette":
        """A palette with the centres on `device` (self when they already are)."""
        device = torch.device(device)
        return self if self.centres.device == device else Palette(self.centres.to(device))

    def __repr__(self) -> str:
        return f"Palette(n_clusters={self.n_clusters}, device={self.device})"

    # --- quantize / decode ------------------------------------------------------------------------------------

    def quantize(self, pixels, chunk_size: int | None = None) -> torch.Tensor:
        """uint8 RGB [..., 3] (tensor or numpy) -> int64 ids [...] on the pixels' device, by the exact rule.

        Each distinct colour is searched once (colours are deduplicated per call), then broadcast back.
        """
        pixels = _as_pixel_tensor(pixels)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (pixels per distance block), got {chunk_size}")
        flat = pixels.reshape(-1, 3)
        if flat.shape[0] == 0:
            return torch.empty(pixels.shape[:-1], dtype=torch.long, device=pixels.device)
        colours, inverse = torch.unique(_pack(flat), return_inverse=True)
        ids, _ = _nearest(_to_unit(_unpack(colours)), [c.to(pixels.device) for c in self._columns], chunk_size)
        return ids[inverse].reshape(pixels.shape[:-1])

    def decode(self, ids) -> torch.Tensor:
        """int ids [...] (tensor or numpy) -> uint8 RGB [..., 3] = rint(127.5 * (centre + 1)) clipped to 0..255."""
        if isinstance(ids, np.ndarray):
            ids = torch.from_numpy(ids)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be an integer torch.Tensor or numpy.ndarray, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must have an integer dtype (int64 token ids), got {ids.dtype}; use ids.long()")
        if ids.numel() > 0:
            lo, hi = ids.min().item(), ids.max().item()
            if lo < 0 or hi >= self.n_clusters:
                raise ValueError(f"ids must lie in 0..{self.n_clusters - 1} for a palette of {self.n_clusters} "
                                 f"colours, got values in {lo}..{hi} (the SOS id 512 is not a colour)")
        return self.colours.to(ids.device)[ids.long()]

    @property
    def colours(self) -> torch.Tensor:
        """uint8 [K, 3]: the RGB colour each id decodes to."""
        return torch.round(127.5 * (self.centres + 1.0)).clamp_(0, 255).to(torch.uint8)

    # --- k-means ------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, pixels, n_clusters: int = 512, seed: int = 0, iters: int = 30, sample: int = 1_000_000,
            device=None, chunk_size: int | None = None, init=None) -> "Palette":
        """k-means (k-means++ init, Lloyd iterations) on RGB scaled to [-1, 1].

        pixels: uint8 [..., 3] tensor or numpy array. At most `sample` pixels, drawn at random, are clustered.
        The sample is reduced to its distinct colours with counts and clustered as weighted points, which is the same
        k-means at a fraction of the cost. Assignment uses the exact quantize rule in [chunk, K] blocks; sums are
        accumulated in fp64. Empty (or duplicate) centres are re-seeded with the points farthest from the rest, so
        the result has `n_clusters` distinct centres. Stops early when no assignment changes.
        Runs on `device` (default: the pixels' device). All random draws come from a CPU torch.Generator seeded with
        `seed`, so a seed gives the same palette on every run (bit-identical on the CPU).
        `init` ([n_clusters, 3] centres in [-1, 1], e.g. a released palette) replaces the k-means++ seeding.
        Raises ValueError when the sample holds fewer distinct colours than `n_clusters`.
        """
        pixels = _as_pixel_tensor(pixels)
        for name, value, low in (("n_clusters", n_clusters, 1), ("iters", iters, 0), ("sample", sample, 1),
                                 ("chunk_size", 1 if chunk_size is None else chunk_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        device = torch.device(device) if device is not None else pixels.device
        if init is not None:
            init = _check_centres(init, source="init").to(device)
            if init.shape[0] != n_clusters:
                raise ValueError(f"init has {init.shape[0]} centres but n_clusters={n_clusters}; pass matching values")
        gen = torch.Generator().manual_seed(seed)

        flat = pixels.reshape(-1, 3)
        n = flat.shape[0]
        if n > sample:  # random subsample; with replacement when the population is huge (no O(n) permutation)
            pick = torch.randperm(n, generator=gen)[:sample] if n <= 8 * sample \
                else torch.randint(n, (sample,), generator=gen)
            flat = flat[pick.to(flat.device)]
        codes, counts = torch.unique(_pack(flat.to(device)), return_counts=True)  # sorted: deterministic order
        if codes.numel() < n_clusters:
            raise ValueError(f"cannot fit {n_clusters} clusters: the pixels (a sample of {flat.shape[0]}) hold only "
                             f"{codes.numel()} distinct colours; use n_clusters <= {codes.numel()} "
                             f"or more varied images")
        x = _to_unit(_unpack(codes))  # [U, 3] distinct colours in [-1, 1]
        w = counts.to(torch.float64)  # [U] how often each occurs

        centres = init if init is not None else _kmeans_pp(x, w, n_clusters, gen)
        prev = None
        for _ in range(iters):
            ids, _ = _nearest(x, _centre_columns(centres), chunk_size)
            if prev is not None and torch.equal(ids, prev):
                break  # converged: the centres are already the means of this assignment
            prev = ids
            sums = torch.zeros(n_clusters, 3, dtype=torch.float64, device=device)
            sums.index_add_(0, ids, x.double() * w[:, None])
            mass = torch.zeros(n_clusters, dtype=torch.float64, device=device).index_add_(0, ids, w)
            new = (sums / mass.clamp(min=1e-300)[:, None]).float().clamp_(-1, 1)
            keep = mass > 0
            keep &= ~_duplicates(new)
            if not keep.all():
                new = _reseed(x, new, keep, chunk_size)
                prev = None  # the assignment will change
            centres = new
        return cls(centres)

    # --- files ----------------------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write `.npy` (float32 [K, 3], the released kmeans_centers.npy format) or `.safetensors` (key "centres").

        Atomic: the file is written next to its destination and renamed over it.
        """
        path = Path(path)
        suffix = _check_suffix(path)
        centres = self.centres.detach().cpu().contiguous()
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the usual permissions (umask applies)
        try:
            with os.fdopen(fd, "wb") as f:
                if suffix == ".npy":
                    np.save(f, centres.numpy(), allow_pickle=False)
                else:
                    from safetensors.torch import save as safetensors_bytes
                    f.write(safetensors_bytes({"centres": centres}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "Palette":
        """Read a palette written by `save` (or openai/image-gpt's kmeans_centers.npy). Bad files -> ValueError."""
        path = Path(path)
        suffix = _check_suffix(path)
        if not path.is_file():
            raise FileNotFoundError(f"palette file not found: {path}")
        try:
            if suffix == ".npy":
                centres = np.load(path, allow_pickle=False)
            else:
                from safetensors.torch import load_file
                tensors = load_file(path)
                if "centres" not in tensors:
                    raise ValueError(f"no tensor named 'centres' (found {sorted(tensors)})")
                centres = tensors["centres"]
        except ValueError as err:
            raise ValueError(f"{path}: not a valid palette file: {err}") from None
        except Exception as err:  # corrupt header, truncated data, ... (numpy / safetensors raise various types)
            raise ValueError(f"{path}: not a valid palette file ({type(err).__name__}: {err})") from None
        try:
            return cls(_check_centres(centres, source=str(path)))
        except TypeError as err:  # e.g. an integer array: the file is wrong, not the caller's argument
            raise ValueError(str(err)) from None

    @classmethod
    def from_hf(cls, clusters) -> "Palette":
        """Palette from `transformers.ImageGPTImageProcessor(...).clusters` (array-like [K, 3] in [-1, 1])."""
        if clusters is None:
            raise ValueError("clusters is None: this ImageGPTImageProcessor has no palette (do_color_quantize "
                             "needs processor.clusters); load the processor from an ImageGPT checkpoint")
        return cls(_check_centres(clusters, source="HF clusters"))


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _pack(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3] -> int32 [N] colour codes r * 65536 + g * 256 + b (order-preserving, for torch.unique)."""
    rgb = rgb.to(torch.int32)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack: int32 [N] -> uint8 [N, 3]."""
    return torch.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], dim=1).to(torch.uint8)


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        raise ValueError(f"{path}: unknown palette format {path.suffix!r}; use a .npy or .safetensors file")
    return suffix


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on weighted distinct points: each next centre is drawn with probability ~ w * D^2.

    One uniform number per draw comes from the CPU generator; the draw itself is an inverse-CDF lookup on the
    device, so no device generator is needed.
    """
    u = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device)
    idx = torch.empty(k, dtype=torch.long, device=x.device)

    def draw(p: torch.Tensor, j: int) -> torch.Tensor:
        cdf = torch.cumsum(p, 0)
        return torch.searchsorted(cdf, (u[j] * cdf[-1]).reshape(1), right=True).clamp_(max=p.numel() - 1)

    idx[0:1] = draw(w, 0)
    d2 = _sq_dist(x, x[idx[0]])
    for j in range(1, k):
        idx[j:j + 1] = draw(w * d2.double(), j)
        torch.minimum(d2, _sq_dist(x, x[idx[j]]), out=d2)
    return x[idx].clone()


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distance of every row of x [N, 3] to one centre c [3], by the same per-channel rule."""
    d = x - c
    d.mul_(d)
    return d[:, 0] + d[:, 1] + d[:, 2]


def _duplicates(c: torch.Tensor) -> torch.Tensor:
    """bool [K]: True for every centre equal to an earlier one."""
    _, inverse = torch.unique(c, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), c.shape[0], dtype=torch.long, device=c.device)
    first.scatter_reduce_(0, inverse, torch.arange(c.shape[0], device=c.device), reduce="amin")
    return first[inverse] != torch.arange(c.shape[0], device=c.device)


def _reseed(x: torch.Tensor, centres: torch.Tensor, keep: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Replace the centres not in `keep` with the distinct points farthest from the kept centres.

    With at least K distinct points, at most (#kept) points coincide with a kept centre, so the farthest
    (K - #kept) points are at a positive distance: the result has K distinct centres.
    """
    new = centres.clone()
    _, d2 = _nearest(x, _centre_columns(centres[keep]), chunk_size)
    n_new = int((~keep).sum())
    far = torch.sort(d2, descending=True, stable=True).indices[:n_new]  # ties -> lowest index: deterministic
    new[~keep] = x[far]
    return new
