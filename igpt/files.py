"""Published model files: model.safetensors + config.json (+ palette.npy) in a directory, written atomically.

`Decoder.save_pretrained` / `Decoder.from_pretrained` call `save_pretrained` / `load_pretrained` here. Loading also
takes a step-N training checkpoint (DCP, igpt/checkpoint.py) or a run directory without final weights (its latest
checkpoint): `resolve_weights` is the one place that turns a path into weights and config.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from igpt.config import IGPTConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PALETTE_NAME = "palette.npy"


def atomic_write(path: Path, write) -> None:
    """write(tmp) into a temporary file in the same directory, then rename it: a crash never leaves a torn file."""
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


def save_pretrained(model, path) -> Path:
    """Write model.safetensors + config.json (+ palette.npy when attached) into the directory `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(model.cfg.to_json()))
    if model.palette is not None:
        model.palette.save(path / PALETTE_NAME)
    return path


def load_pretrained(model_cls, path, map_location="cpu"):
    """`model_cls(config)` with the weights of `path` (see `resolve_weights`); palette.npy next to the weights is
    attached when present."""
    weights, config = resolve_weights(Path(path))
    try:
        cfg = IGPTConfig.from_dict(json.loads(config.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{config}: not a valid iGPT config.json ({e})") from e
    model = model_cls(cfg)
    if weights.is_dir():  # a resumable step-N checkpoint (DCP: trusted sources only)
        from igpt.checkpoint import load_model_weights

        state = {k: v.to(map_location) for k, v in load_model_weights(weights).items()}
    else:
        state = load_safetensors(weights, map_location)
    model.load_state_dict(state)
    palette_file = (weights if weights.is_dir() else weights.parent) / PALETTE_NAME
    if palette_file.exists():
        from igpt.palette import Palette

        model.attach_palette(Palette.load(palette_file))
    return model


def resolve_weights(path: Path) -> tuple[Path, Path]:
    """(weights, config.json) of a run dir, a step-N checkpoint dir or a .safetensors file; weights is a
    .safetensors file or a step-N checkpoint directory (DCP)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory, a step-N checkpoint directory or a "
                                ".safetensors file")
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
        weights = path
    else:
        raise ValueError(f"{path}: expected a directory or a .safetensors file")
    config = (weights if weights.is_dir() else weights.parent) / CONFIG_NAME
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing: the weights need the config.json they were saved with")
    return weights, config


def load_safetensors(path: Path, map_location) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
