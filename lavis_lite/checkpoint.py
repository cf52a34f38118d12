"""Checkpoints: one directory per step, written atomically, holding trainable weights and training state.

    run_dir/checkpoints/step-00001000/model.safetensors   trainable parameters (frozen parts are not saved)
                                     /training_state.pt   optimizer, scheduler, RNG, data position, counters
                                     /config.yaml         the full run config
    run_dir/checkpoints/latest                            name of the newest complete checkpoint
"""

from __future__ import annotations

import random
import shutil
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
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    config: Any,
    keep: int = 2,
) -> Path:
    """Write `checkpoints/step-N` atomically (temp dir + rename), point `latest` at it, prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = staging_dir(final)
    save_file(trainable_state_dict(model), str(tmp / WEIGHTS))
    torch.save(training_state, tmp / STATE)
    (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    replace_dir(tmp, final)
    atomic_write_text(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / WEIGHTS).is_file() and (path / STATE).is_file() else None


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


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / WEIGHTS))


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE, map_location="cpu", weights_only=False)
