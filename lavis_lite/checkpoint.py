"""Checkpoints: one directory per step, written atomically, holding trainable weights and training state.

    run_dir/checkpoints/step-00001000/model.safetensors   trainable parameters (frozen parts are not saved)
                                     /training_state.pt   optimizer, scheduler, RNG, data position, counters
                                     /config.yaml         the full run config
    run_dir/checkpoints/latest                            name of the newest complete checkpoint

The training state holds tensors, numbers, strings and containers only and is read with
`torch.load(weights_only=True)`, which builds nothing else: a planted pickle cannot run code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from lavis_lite.config import ConfigError
from lavis_lite.errors import MissingFileError
from lavis_lite.io import atomic_write_text, replace_dir, staging_dir

WEIGHTS = "model.safetensors"
STATE = "training_state.pt"
CONFIG = "config.yaml"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (frozen encoders and LLMs are rebuilt from their own weights)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load trainable weights; every trainable parameter must be present and no key may be unknown."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(dict(model.named_parameters())))
    if missing or unexpected:
        raise ConfigError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


def rng_state() -> dict[str, Any]:
    """Every generator's state, numpy's array as a tensor (so the state loads with `weights_only=True`)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # checkpoints before the tensor form
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    config: Any,
) -> Path:
    """Write `checkpoints/step-N` atomically (temp dir + rename) and point `latest` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = staging_dir(final)
    save_file(trainable_state_dict(model), str(tmp / WEIGHTS))
    torch.save(training_state, tmp / STATE)
    (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    replace_dir(tmp, final)
    atomic_write_text(root / "latest", final.name)
    return final


def _complete(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / STATE).is_file()


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and _complete(p)) if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` names where it is complete, else the newest complete one (after the newest was
    deleted to roll back, say), or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if pointer.is_file():
        named = pointer.parent / pointer.read_text().strip()
        if named.name.startswith("step-") and _complete(named):
            return named
    found = checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a run directory, or a run's `checkpoints/` folder."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    for run_dir in (path, path.parent):
        found = latest_checkpoint(run_dir)
        if found is not None:
            return found
    raise MissingFileError(f"no checkpoint at {path}: give a run directory or a checkpoints/step-N directory")


def read_state_dict(path: str | Path, setting: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` or torch weights file, read without running code from it (torch files
    with `weights_only=True`), a top-level `state_dict` / `model` entry unwrapped (LAVIS's `.pth` files).
    MissingFileError / ConfigError name `setting` and the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{setting}={path} not found: give a local weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files raise many types
        raise ConfigError(
            f"{setting}={path} is not a readable weights file ({_describe(err, 160)})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{setting}={path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _describe(err: Exception, limit: int) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of one of our checkpoints."""
    return read_state_dict(Path(checkpoint) / WEIGHTS, "checkpoint")


# Older checkpoints hold numpy's RNG array itself: these are the only globals their states need, and they
# rebuild arrays, nothing else.
_reconstruct = np.ndarray(0).__reduce__()[0]
_OLD_STATE_GLOBALS = [
    _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))
]


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer, scheduler, RNG and counters of a checkpoint, read without running any code from it."""
    path = Path(checkpoint) / STATE
    try:
        with torch.serialization.safe_globals(_OLD_STATE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on foreign bytes
        raise ConfigError(
            f"{path} is not a training state lavis_lite wrote ({_describe(err, 200)}): "
            "resume from another checkpoint, or start the run again"
        ) from None
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise ConfigError(f"{path} is not a training state lavis_lite wrote: resume from another checkpoint")
    return state
