"""A stage-1 recipe: model, data, training loop and evaluation, as one structured config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lavis_lite.config import ModelConfig, merge_config, recipe_path
from lavis_lite.data import DataConfig
from lavis_lite.training.train_config import TrainConfig


@dataclass
class EvalConfig:
    """Held-out retrieval: ITC ranking, optionally ITM re-ranking of each query's top k."""

    itm_rerank_k: int = 0  # 0: ITC only; BLIP-2 reports k = 128
    batch_size: int = 256


@dataclass
class Stage1Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_stage1_config(path: str | Path, overrides: Sequence[str] = ()) -> Stage1Config:
    """A Stage1Config from a recipe (a YAML path or a packaged name such as `stage1/demo`) and overrides."""
    return merge_config(Stage1Config, [recipe_path(path)], overrides)
