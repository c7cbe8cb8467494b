"""Resumable training checkpoints: RUN_DIR/checkpoints/step-N/, written with torch.distributed.checkpoint (DCP).

Layout of one checkpoint (every rank writes its own shards; rank 0 writes the rest):

    step-N/
      .metadata, __0_0.distcp, ...   DCP: model + optimizer state, sharded as in training (reshardable on load)
      rng-rank{R}.safetensors        each rank's torch (and CUDA) RNG state
      trainer.json                   step, world size, the arguments that must match on resume
      config.json, palette.npy       so `Decoder.from_pretrained(step-N)` and `--checkpoint step-N` work
      manifest.json                  size and sha256 of every other file: written last, checked before loading

Why the manifest: DCP reads its metadata with pickle and fails with unhelpful errors on torn files. A checkpoint is
built under a temporary name (.step-N.tmp) and renamed only once the manifest is written, so a crash mid-save leaves
the previous checkpoint untouched; the manifest then turns bit rot or truncation into an error naming the file.
Older checkpoints are deleted only after the new one is complete (keep the last K).

DCP metadata is unpickled on load: load checkpoints from trusted sources only. Published weights are the
safetensors file the trainer writes at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the run."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (d := _dist()) is not None:
        d.barrier()


def _rank() -> int:
    return d.get_rank() if (d := _dist()) is not None else 0


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it is "assuming the intent is to save/load in a single process" without a process group: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        yield


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root (temporary .step-N.tmp directories are ignored), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found)


def latest(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, app_state: dict, trainer_state: dict, extra_files: dict[str, callable] | None = None,
         keep: int = 3) -> Path:
    """Collective: every rank calls it. Writes root/step-{step} atomically and keeps the newest `keep` checkpoints.

    app_state: DCP state dict (e.g. {"model": ..., "optim": ...} from get_state_dict).
    extra_files: {file name: writer(path)} run on rank 0 (config.json, palette.npy).
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    root = Path(root)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save that died earlier
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    with _single_process_ok():
        dcp.save(app_state, checkpoint_id=str(tmp), no_dist=_dist() is None)
    save_file(_rng_state(), str(tmp / f"rng-rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        _write_json(tmp / TRAINER_STATE, {"step": step, **trainer_state})
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        _write_json(tmp / MANIFEST, {"step": step, "files": manifest})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): the new one replaces it only when complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in step_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def verify(path: Path) -> dict:
    """Check a checkpoint against its manifest; returns trainer.json. Raises CheckpointError naming the bad file."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{manifest_file} is missing: {path} is not a complete checkpoint "
                              "(a save that never finished?); delete it to resume from the previous one")
    try:
        manifest = json.loads(manifest_file.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_file} is corrupt ({e}); delete {path} to resume from the previous one") from e
    for name, expected in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; delete {path} to resume from the previous one")
        size = f.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt ({size} bytes, the manifest says "
                                  f"{expected['bytes']}); delete {path} to resume from the previous one")
        if _sha256(f) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 differs from the manifest); "
                                  f"delete {path} to resume from the previous one")
    return json.loads((path / TRAINER_STATE).read_text())


def load(path: Path, app_state: dict) -> dict:
    """Collective: verify (rank 0; the result is shared), then load app_state in place and restore this rank's RNG.
    Returns trainer.json. DCP unpickles its metadata: trusted checkpoints only."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    path = Path(path)
    error, state = None, None
    if _rank() == 0:
        try:
            state = verify(path)
        except CheckpointError as e:
            error = str(e)
    if (d := _dist()) is not None:
        box = [(error, state)]
        d.broadcast_object_list(box, src=0)
        error, state = box[0]
    if error:
        raise CheckpointError(error)
    try:
        with _single_process_ok():
            dcp.load(app_state, checkpoint_id=str(path), no_dist=_dist() is None)
    except Exception as e:  # DCP raises many types (CheckpointException, RuntimeError, pickle errors)
        raise CheckpointError(f"could not load the DCP checkpoint {path}: {e}") from e
    rng_file = path / f"rng-rank{_rank()}.safetensors"
    if rng_file.is_file():  # a resume on more ranks than were saved keeps the fresh RNG of the extra ranks
        _set_rng_state(load_file(str(rng_file)))
    return state


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's full state dict from a step-N checkpoint, in one process (for from_pretrained / probe / sample).
    Trusted checkpoints only (DCP metadata is unpickled)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    verify(path)
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    shapes = {k.removeprefix("model."): m for k, m in metadata.state_dict_metadata.items()
              if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    state = {"model": {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in shapes.items()}}
    try:
        with _single_process_ok():
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"could not load the model weights of {path}: {e}") from e
    return state["model"]
