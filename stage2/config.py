"""A stage-2 recipe: model (Q-Former side + frozen LLM), data, training loop and caption evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lavis_lite.config import Stage2ModelConfig, merge_config, recipe_path
from lavis_lite.data import DataConfig
from lavis_lite.training.train_config import TrainConfig


@dataclass
class CaptionEvalConfig:
    """Held-out captioning: generation settings and how many images and examples."""

    num_beams: int = 5
    max_new_tokens: int = 30
    batch_size: int = 64
    max_images: int = 0  # 0: the whole held-out split
    examples: int = 8  # held-out captions printed next to their true captions
    # The synthetic shapes' metric: share of images whose caption names each object's colour and shape.
    synthetic_attributes: bool = False


@dataclass
class Stage2Config:
    model: Stage2ModelConfig = field(default_factory=Stage2ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)


def load_stage2_config(path: str | Path, overrides: Sequence[str] = ()) -> Stage2Config:
    """A Stage2Config from a recipe (a YAML path or a packaged name such as `stage2/demo`) and overrides."""
    return merge_config(Stage2Config, [recipe_path(path)], overrides)
