"""Published model files: model.safetensors + config.json (+ palette.npy) in a directory, written atomically.

`Decoder.save_pretrained` / `Decoder.from_pretrained` call `save_pretrained` / `load_pretrained` here. Loading also
takes a step-N training checkpoint (DCP, igpt/checkpoint.py) or a run directory without final weights (its latest
checkpoint): `resolve_weights` is the one place that turns a path into weights and config. A directory written by
transformers' `save_pretrained` of an ImageGPT model (config.json model_type "imagegpt") is converted on load
(igpt.convert), and a Hugging Face Hub id like openai/imagegpt-small is fetched first (`locate`).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from igpt.config import IGPTConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PALETTE_NAME = "palette.npy"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")  # owner/name
HUB_TIMEOUT_S = 10  # per request: an unreachable hub fails in seconds, never hangs
_LOCAL_HINT = ("pass a local directory instead: one written by transformers' save_pretrained, or our format made "
               "on a machine with network by `python -m igpt.convert --from-hf ID --out DIR`")


class WeightsUnavailableError(FileNotFoundError):
    """A hub id that could not be fetched (offline, unreachable, unknown, gated); the message says how to pass a
    local directory instead."""


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
    attached when present; a transformers ImageGPT directory or hub id is converted, with the processor's palette."""
    path = locate(path)
    if path.is_dir():
        from igpt.convert import is_hf_dir, load_hf_dir

        if is_hf_dir(path):
            cfg, state, palette = load_hf_dir(path)
            model = model_cls(cfg)
            model.load_state_dict({k: v.to(map_location) for k, v in state.items()})
            return model if palette is None else model.attach_palette(palette)
    weights, config = resolve_weights(path)
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


def locate(path) -> Path:
    """An existing path as it is; a missing one that looks like owner/name is fetched from the Hugging Face Hub
    (config, processor and weights only) into its cache; anything else does not exist."""
    p = Path(path)
    if p.exists():
        return p
    if looks_like_hub_id(path):
        return fetch_hub(path)
    raise FileNotFoundError(f"checkpoint {path} does not exist: pass a run directory, a step-N checkpoint directory, "
                            "a .safetensors file, a transformers ImageGPT directory or a hub id (owner/name)")


def looks_like_hub_id(path) -> bool:
    """owner/name, not a file name (.safetensors, ...) and not under an existing local directory (runs/typo)."""
    if not isinstance(path, str) or not HUB_ID.fullmatch(path):
        return False
    return Path(path).suffix not in (".safetensors", ".json", ".npy", ".bin") and not Path(path).parent.is_dir()


def fetch_hub(repo_id: str) -> Path:
    """snapshot_download of an ImageGPT repository: config.json, preprocessor_config.json, model.safetensors (or,
    where the repository has none, pytorch_model.bin). Offline or unreachable -> WeightsUnavailableError."""
    from huggingface_hub import snapshot_download

    get = dict(repo_id=repo_id, etag_timeout=HUB_TIMEOUT_S)
    small = ["config.json", "preprocessor_config.json", WEIGHTS_NAME, PALETTE_NAME]  # palette.npy: a repo in our format
    try:
        root = Path(snapshot_download(allow_patterns=small, **get))
        if not (root / WEIGHTS_NAME).exists():
            root = Path(snapshot_download(allow_patterns=["pytorch_model.bin"], **get))
    except Exception as e:  # offline, connection refused, timeout, unknown or gated repo: one clear message
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsUnavailableError(f"{repo_id!r} is not a local path, and as a hub id it could not be fetched "
                                      f"from the Hugging Face Hub ({type(e).__name__}: {why}); {_LOCAL_HINT}") from None
    if not (root / CONFIG_NAME).exists():
        raise WeightsUnavailableError(f"hub repository {repo_id!r} has no config.json: not a model repository")
    return root


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
    elif not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
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
