"""The data order and the loader: one global permutation per epoch, batches in order, each rank takes its
contiguous slice, so the batches of a step do not depend on the number of ranks. This module also re-exports the
embedded dataset (igpt.shapes) and the dataset sources (igpt.sources): `igpt.data` is the one import for data.

    src = open_source("shapes" | "imagefolder:DIR" | DIR | HUB_ID, "train" | "test", resolution, seed=...)
    images, labels = src.get(indices, train=True, epoch=e)    # uint8 [n, R, R, 3], int64 [n] (or None)
    idx, epoch = global_batch_indices(step, global_batch, len(src), seed)   # the same for any world size
    local = rank_slice(idx, rank, world_size)                 # this rank's contiguous part of the global batch
    mask = bert_mask_for(local, step, seq_len, seed)          # a pure function of (seed, sample index, step)
    for step, images, labels, local in BatchLoader(src, global_batch, rank=r, world_size=w).iterate(s0, s1): ...

Each epoch's permutation comes from a torch.Generator seeded by a hash of (seed, epoch) and every BERT mask from a
hash of (seed, step, sample index, position) (igpt.hashing), so any batch of any step can be rebuilt after a resume.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.data import Dataset

from igpt.hashing import STREAM_BERT, STREAM_PERM, as_index_array, check_int, hash_uniform, key
from igpt.shapes import (N_CLASSES, SHAPES_CLASSES, SHAPES_COLOURS, TEST_START, ShapesDataset, make_shapes,
                         shapes_labels, shapes_palette)
from igpt.sources import (HELD_OUT_FRACTION, DatasetUnavailableError, HFSource, ImageSource, ShapesSource, open_source,
                          resize_crop)

__all__ = [  # the loader's own names, then the re-exported dataset and sources
    "BatchLoader", "bert_mask_for", "global_batch_indices", "rank_slice",
    "N_CLASSES", "SHAPES_CLASSES", "SHAPES_COLOURS", "TEST_START", "ShapesDataset", "make_shapes", "shapes_labels",
    "shapes_palette",
    "HELD_OUT_FRACTION", "DatasetUnavailableError", "HFSource", "ImageSource", "ShapesSource", "open_source",
    "resize_crop",
]


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(key(STREAM_PERM, seed, epoch)) & ((1 << 63) - 1))
    return torch.randperm(n, generator=g)


def global_batch_indices(step: int, global_batch: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """(int64 [global_batch] sample indices of global batch `step`, its epoch). Independent of the world size.

    Epoch e is one permutation of range(n) from a torch.Generator seeded by a hash of (seed, e); it yields
    n // global_batch batches in order and its last partial batch is dropped (those samples come back at random
    places in later epochs), so step s is batch s % (n // global_batch) of epoch s // (n // global_batch).
    """
    step = check_int("step", step, 0)
    global_batch = check_int("global_batch", global_batch, 1)
    n = check_int("n", n, 1)
    seed = check_int("seed", seed, 0)
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the dataset has {n} images, fewer than one global batch of {global_batch}; "
                         "lower --batch-size or use a larger dataset")
    epoch, b = divmod(step, per_epoch)
    return _epoch_permutation(n, seed, epoch)[b * global_batch:(b + 1) * global_batch].clone(), epoch


def _check_ranks(global_batch: int, rank, world_size) -> tuple[int, int]:
    """(rank, world_size) as ints, with rank < world_size and a global batch that the world size divides."""
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
    if global_batch % world_size:
        raise ValueError(f"the global batch ({global_batch}) must be divisible by the world size ({world_size}); "
                         "pick --batch-size as a multiple of the number of processes")
    return rank, world_size


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch: indices[rank * B/W : (rank + 1) * B/W]."""
    rank, world_size = _check_ranks(len(indices), rank, world_size)
    per = len(indices) // world_size
    return indices[rank * per:(rank + 1) * per]


def bert_mask_for(sample_indices, step: int, seq_len: int, seed: int, rate: float = 0.15) -> torch.Tensor:
    """bool [n, seq_len], True = masked: each token independently with probability `rate` (as random_bert_mask),
    from a hash of (seed, step, sample index, position) - the same whichever rank holds the sample."""
    idx = as_index_array(sample_indices, "sample_indices")
    step = check_int("step", step, 0)
    seq_len = check_int("seq_len", seq_len, 1)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    u = hash_uniform(key(STREAM_BERT, check_int("seed", seed, 0), step), idx, seq_len)
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
        self.global_batch = check_int("global_batch", global_batch, 1)
        self.rank, self.world_size = _check_ranks(self.global_batch, rank, world_size)
        self.seed = check_int("seed", seed, 0)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.prefetch_factor = check_int("prefetch_factor", prefetch_factor, 1)
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
        start_step = check_int("start_step", start_step, 0)
        end_step = check_int("end_step", end_step, start_step)
        if self.num_workers == 0:
            for step in range(start_step, end_step):
                yield (step, *self.batch(step))
            return
        loader = torch.utils.data.DataLoader(
            _Steps(self), batch_size=None, sampler=range(start_step, end_step), num_workers=self.num_workers,
            collate_fn=_keep, prefetch_factor=self.prefetch_factor)
        yield from loader
