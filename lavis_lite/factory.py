"""Build a stage-1 model (and its tokenizer) from a config name, a YAML path or a ModelConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

from .config import ModelConfig, load_model_config, merge_config, to_dict
from .stage1_model import Blip2Stage1
from .tokenizer import build_tokenizer


def resolve_model_config(model: str | Path | ModelConfig, overrides: Sequence[str] = ()) -> ModelConfig:
    """A ModelConfig from a name under configs/model/, a YAML path or a ModelConfig, with overrides applied."""
    if isinstance(model, ModelConfig):
        if overrides:
            return merge_config(ModelConfig, [to_dict(model)], overrides)
        return model
    return load_model_config(model, overrides)


def create_tokenizer(cfg: ModelConfig) -> Optional[PreTrainedTokenizerBase]:
    """The Q-Former tokenizer named by `qformer.tokenizer` (or `qformer.bert`); None when neither is set."""
    path = cfg.qformer.tokenizer or cfg.qformer.bert
    return build_tokenizer(path) if path else None


def create_model(
    model: str | Path | ModelConfig, overrides: Sequence[str] = ()
) -> tuple[Blip2Stage1, Optional[PreTrainedTokenizerBase]]:
    """A stage-1 model and its tokenizer, e.g. `create_model("tiny", ["qformer.num_layers=2"])`."""
    cfg = resolve_model_config(model, overrides)
    tokenizer = create_tokenizer(cfg)
    if tokenizer is None:
        return Blip2Stage1(cfg), None
    if len(tokenizer) != cfg.qformer.vocab_size:
        raise ValueError(
            f"qformer.vocab_size={cfg.qformer.vocab_size} but the tokenizer has {len(tokenizer)} tokens "
            f"(with [DEC]): set qformer.vocab_size={len(tokenizer)}"
        )
    return Blip2Stage1(cfg, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id), tokenizer
