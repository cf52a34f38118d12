"""Build models from a config name, a YAML path or a config object: stage 1 (with its tokenizer) and stage 2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from lavis_lite.checkpoint import CONFIG, load_trainable_state_dict, load_weights, resolve_checkpoint
from lavis_lite.config import ConfigError, ModelConfig, Stage2ModelConfig, load_model_config, merge_config, named_config, to_dict
from lavis_lite.interop.convert_lavis import load_lavis_weights
from lavis_lite.models.llm import load_language_model
from lavis_lite.models.qformer import load_bert_weights
from lavis_lite.models.stage1_model import Blip2Stage1
from lavis_lite.models.stage2_model import Blip2Stage2
from lavis_lite.models.tokenizer import build_tokenizer


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
        return _with_bert_weights(Blip2Stage1(cfg)), None
    if len(tokenizer) != cfg.qformer.vocab_size:
        raise ConfigError(
            f"qformer.vocab_size={cfg.qformer.vocab_size} but the tokenizer has {len(tokenizer)} tokens "
            f"(with [DEC]): set qformer.vocab_size={len(tokenizer)}"
        )
    model = Blip2Stage1(cfg, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _with_bert_weights(model), tokenizer


def _with_bert_weights(model: Blip2Stage1) -> Blip2Stage1:
    """The Q-Former initialised from `qformer.bert` where it is set (BLIP-2 starts from BERT-base), then LAVIS's
    weights from `lavis_checkpoint` where that is set."""
    if model.cfg.qformer.bert:
        load_bert_weights(model.qformer, model.cfg.qformer.bert)
    if model.cfg.lavis_checkpoint:
        load_lavis_weights(model, model.cfg.lavis_checkpoint, stage=1)
    return model


def load_stage1_checkpoint(
    checkpoint: str | Path, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
) -> tuple[Blip2Stage1, Optional[PreTrainedTokenizerBase]]:
    """A trained stage-1 model (eval mode) and its tokenizer from a run directory or checkpoint (its config.yaml
    and trainable weights); `overrides` apply to the run's `model:` section, e.g. `vision.precision=bf16`."""
    path = resolve_checkpoint(checkpoint)
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{path} has no {CONFIG}: give a directory written by lavis-lite train-stage1")
    run_config = OmegaConf.to_container(OmegaConf.load(path / CONFIG), resolve=True)
    model_config = run_config.get("model")
    if not isinstance(model_config, dict) or "llm" in model_config:
        found = "a stage-2 checkpoint (model.llm is set)" if isinstance(model_config, dict) else f"no model section in {CONFIG}"
        raise ConfigError(
            f"{path} is not a stage-1 checkpoint ({found}): give a stage-1 run directory (the train.output_dir of "
            "lavis-lite train-stage1) or one of its checkpoints/step-N directories"
        )
    # The trained weights replace the BERT initialisation: of `qformer.bert` only its tokenizer is needed.
    qformer = model_config.get("qformer") or {}
    tokenizer_dir = qformer.get("tokenizer") or qformer.get("bert")
    weights_only = ["qformer.bert=null", "lavis_checkpoint=null", *([f"qformer.tokenizer={tokenizer_dir}"] if tokenizer_dir else [])]
    model, tokenizer = create_model(merge_config(ModelConfig, [model_config], [*weights_only, *overrides]))
    load_trainable_state_dict(model, load_weights(path), str(path))
    return model.to(device).eval(), tokenizer


def create_stage2_model(
    model: str | Path | Stage2ModelConfig, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
) -> Blip2Stage2:
    """A stage-2 model from a name under configs/model/, a YAML path or a Stage2ModelConfig: the frozen LLM
    loaded from `llm.path`, the Q-Former from `stage1_checkpoint` when it is set, else from `qformer.bert`."""
    if isinstance(model, Stage2ModelConfig):
        cfg = merge_config(Stage2ModelConfig, [to_dict(model)], overrides) if overrides else model
    else:
        cfg = merge_config(Stage2ModelConfig, [named_config(model)], overrides)
    llm, tokenizer = load_language_model(cfg.llm, device)
    stage2 = Blip2Stage2(cfg, llm, tokenizer)
    if cfg.stage1_checkpoint:
        load_stage1_weights(stage2, cfg.stage1_checkpoint)
    elif cfg.qformer.bert:
        load_bert_weights(stage2.qformer, cfg.qformer.bert)
    if cfg.lavis_checkpoint:
        load_lavis_weights(stage2, cfg.lavis_checkpoint, stage=2)
    return stage2.to(device).eval()


# The parts of a stage-1 checkpoint that stage 2 starts from (its ITC/ITM/ITG heads are not used).
STAGE1_PREFIXES = ("ln_vision.", "query_tokens", "qformer.")
# The text side of a stage-1 Q-Former, which stage 2 does not hold.
STAGE1_TEXT_SIDE = re.compile(r"^qformer\.(embeddings\.(word|position)\.|layers\.\d+\.ffn_text\.|lm_head\.)")


def load_stage1_weights(model: Blip2Stage2, checkpoint: str | Path) -> None:
    """Start a stage-2 model from a trained stage-1 Q-Former: its ln_vision, queries and query-side weights."""
    path = resolve_checkpoint(checkpoint)
    state = {k: v for k, v in load_weights(path).items() if k.startswith(STAGE1_PREFIXES)}
    own = model.state_dict()
    ours = {k for k in own if k.startswith(STAGE1_PREFIXES)}
    missing = sorted(ours - set(state))
    if missing:
        raise ConfigError(f"stage-1 checkpoint {path} lacks {missing[:5]}: is it a stage-1 checkpoint of this Q-Former?")
    unexpected = sorted(k for k in set(state) - ours if not STAGE1_TEXT_SIDE.match(k))
    if unexpected:
        raise ConfigError(f"stage-1 checkpoint {path} does not fit model.qformer: this model has no {unexpected[:3]}")
    mismatched = [k for k in ours if state[k].shape != own[k].shape]
    if mismatched:
        raise ConfigError(
            f"stage-1 checkpoint {path} does not fit model.qformer / model.vision: shapes differ for {mismatched[:3]}"
        )
    model.load_state_dict({k: state[k] for k in ours}, strict=False)


def load_stage2_checkpoint(
    checkpoint: str | Path, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
) -> Blip2Stage2:
    """A trained stage-2 model from a run directory or checkpoint (its config.yaml and trainable weights)."""
    path = resolve_checkpoint(checkpoint)
    run_config = OmegaConf.to_container(OmegaConf.load(path / CONFIG), resolve=True)
    if "model" not in run_config or "llm" not in run_config["model"]:
        raise ConfigError(
            f"{path} is not a stage-2 checkpoint (its {CONFIG} has no model.llm): give a stage-2 run directory "
            "(the train.output_dir of lavis-lite train-stage2) or one of its checkpoints/step-N directories"
        )
    # The trained weights replace the stage-1 or BERT initialisation, which need not exist any more.
    cfg = merge_config(Stage2ModelConfig, [run_config["model"]], ["stage1_checkpoint=null", "qformer.bert=null", "lavis_checkpoint=null", *overrides])
    model = create_stage2_model(cfg, device=device)
    load_trainable_state_dict(model, load_weights(path), str(path))
    return model
