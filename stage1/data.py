"""Stage-1 data: the recipe's shards (or cached encoder tokens), tokenised for the Q-Former."""

from __future__ import annotations

from lavis_lite.data import SkipCounter
from lavis_lite.data.training_data import TrainingData
from lavis_lite.models.stage1_model import Blip2Stage1

from .config import Stage1Config


def stage1_data(cfg: Stage1Config, model: Blip2Stage1, tokenizer, skipped: SkipCounter) -> TrainingData:
    return TrainingData(cfg.data, cfg.model.vision, model.vision, tokenizer, cfg.model.max_text_len, skipped)
