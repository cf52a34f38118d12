"""Hugging Face model directories: ours -> a directory transformers' `Blip2ForImageTextRetrieval` /
`Blip2ForConditionalGeneration.from_pretrained` opens (config.json, model.safetensors, tokenizer and processor
files with `num_query_tokens`), and such a directory (e.g. a local copy of `Salesforce/blip2-itm-vit-g` or
`Salesforce/blip2-opt-2.7b`) -> our model.

transformers' BLIP-2 holds an EVA-style ViT: models with `vision.kind: vit` export whole. For other encoders
(timm CNNs, open_clip towers) there is no HF layout: `save_pretrained` says so, and `save_qformer` writes the
Q-Former side instead (see its docstring). HF ties `ln_vision`'s epsilon to the ViT's `layer_norm_eps`; where
ours differs (LAVIS: 1e-5 beside a 1e-6 ViT) the export warns, and an import takes HF's value.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from lavis_lite.config import ConfigError, ModelConfig, Stage2ModelConfig, merge_config, to_dict
from lavis_lite.errors import MissingFileError
from lavis_lite.interop.convert_hf import (
    HF_TEXT_FFN,
    NOT_IN_HF,
    from_hf_conditional_generation,
    from_hf_retrieval,
    hf_conditional_generation_config,
    hf_retrieval_config,
    to_hf_conditional_generation,
    to_hf_retrieval,
)
from lavis_lite.io import replace_dir, staging_dir
from lavis_lite.models.stage1_model import Blip2Stage1
from lavis_lite.models.stage2_model import Blip2Stage2

log = logging.getLogger("lavis_lite.interop")

IMAGE_TOKEN = "<image>"  # the LLM token HF's processor repeats num_query_tokens times where the soft prompts go
QFORMER_FILE = "qformer.safetensors"


def _check_vit(cfg: Union[ModelConfig, Stage2ModelConfig], out: Path) -> None:
    if cfg.vision.kind != "vit":
        raise ConfigError(
            f"cannot write {out} as a transformers BLIP-2 directory: HF's Blip2VisionModel holds an EVA-style ViT, "
            f"not vision.kind={cfg.vision.kind!r}; use lavis_lite.interop.hf_pretrained.save_qformer for the Q-Former side"
        )
    if abs(cfg.ln_vision_eps - cfg.vision.layer_norm_eps) > 0:
        warnings.warn(
            f"ln_vision_eps={cfg.ln_vision_eps} differs from vision.layer_norm_eps={cfg.vision.layer_norm_eps}: "
            "transformers uses the ViT's epsilon for ln_vision (post_layernorm), so its outputs differ slightly",
            stacklevel=3,
        )


def _processor_files(out: Path, tokenizer: PreTrainedTokenizerBase, cfg, image_token: Optional[str]) -> None:
    from transformers import BlipImageProcessor, Blip2Processor

    from lavis_lite.models.vision import CLIP_MEAN, CLIP_STD

    size = cfg.vision.image_size
    images = BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    # Stage 2: the processor puts num_query_tokens image tokens before the text; stage 1's text stays as it is.
    kwargs = {"num_query_tokens": cfg.qformer.num_query_tokens} if image_token is not None else {}
    Blip2Processor(image_processor=images, tokenizer=tokenizer, **kwargs).save_pretrained(out)


def _save(hf_model, out: Path, write_extra) -> Path:
    tmp = staging_dir(out)
    hf_model.save_pretrained(tmp)
    write_extra(tmp)
    replace_dir(tmp, out)
    return out


def save_pretrained(model: Union[Blip2Stage1, Blip2Stage2], out: str | Path, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> Path:
    """Write `model` as a transformers BLIP-2 directory (atomically): stage 1 as `Blip2ForImageTextRetrieval`
    (with `tokenizer`, the Q-Former's), stage 2 as `Blip2ForConditionalGeneration` (the LLM's tokenizer gains
    `<image>`, the LLM's embeddings a row for it where the vocabulary has none free). The ITG head and the
    temperature have no HF place and are left out."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    out = Path(out)
    _check_vit(model.cfg, out)
    if isinstance(model, Blip2Stage1):
        hf = Blip2ForImageTextRetrieval(hf_retrieval_config(model.cfg))
        missing, unexpected = hf.load_state_dict(to_hf_retrieval(model.state_dict()), strict=False)
        _check_loaded(missing, unexpected)
        return _save(hf.eval(), out, lambda d: tokenizer is not None and _processor_files(d, tokenizer, model.cfg, None))
    llm_tokenizer = _with_image_token(model.tokenizer)
    image_token_id = llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = model.llm.config.__class__.from_dict(model.llm.config.to_dict())
    text_config.vocab_size = max(text_config.vocab_size, len(llm_tokenizer))
    config = hf_conditional_generation_config(model.cfg, text_config, image_token_id)
    config.qformer_config.use_qformer_text_input = False  # stage 2 never feeds text to the Q-Former
    hf = Blip2ForConditionalGeneration(config)
    state = to_hf_conditional_generation(model.state_dict())
    old = model.llm.get_input_embeddings().weight.shape[0]
    if text_config.vocab_size > old:  # new rows: the mean embedding (never read: HF puts the queries there)
        for key, value in list(state.items()):
            if value.dim() == 2 and value.shape[0] == old and key.startswith("language_model.") and ("embed" in key or "shared" in key or "lm_head" in key):
                extra = value.mean(0, keepdim=True).expand(text_config.vocab_size - old, -1)
                state[key] = torch.cat([value, extra])
    missing, unexpected = hf.load_state_dict(state, strict=False)
    _check_loaded(missing, unexpected)
    hf.generation_config.eos_token_id = model.stop_token_id
    hf.generation_config.pad_token_id = llm_tokenizer.pad_token_id
    hf.generation_config.suppress_tokens = [image_token_id]  # a placeholder of the input, never an output
    return _save(hf.eval(), out, lambda d: _processor_files(d, llm_tokenizer, model.cfg, IMAGE_TOKEN))


def _with_image_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def _check_loaded(missing: list[str], unexpected: list[str]) -> None:
    """Only what HF has and we do not (position ids; the text FFNs, which stage 2 has none of) may be missing."""
    left = sorted(k for k in missing if not (k.endswith("position_ids") or HF_TEXT_FFN.match(k)))
    if unexpected or left:
        raise RuntimeError(f"transformers' model did not take our weights: missing {left[:5]}, unexpected {unexpected[:5]}")


def _hf_state(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(directory / name)))
        return state
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    raise MissingFileError(f"{directory} holds no model.safetensors (or its index): give a transformers BLIP-2 directory")


def _our_config(hf: dict, stage: int) -> dict:
    vision, qformer = hf["vision_config"], hf["qformer_config"]
    out = {
        "vision": {
            "kind": "vit", "image_size": vision["image_size"], "patch_size": vision["patch_size"],
            "width": vision["hidden_size"], "depth": vision["num_hidden_layers"], "heads": vision["num_attention_heads"],
            "mlp_dim": vision["intermediate_size"], "layer_norm_eps": vision["layer_norm_eps"],
        },
        "qformer": {
            "hidden_size": qformer["hidden_size"], "num_layers": qformer["num_hidden_layers"],
            "num_heads": qformer["num_attention_heads"], "intermediate_size": qformer["intermediate_size"],
            "vocab_size": qformer["vocab_size"], "max_position_embeddings": qformer["max_position_embeddings"],
            "layer_norm_eps": qformer["layer_norm_eps"], "cross_attention_freq": qformer["cross_attention_frequency"],
            "num_query_tokens": hf["num_query_tokens"],
            "dropout": qformer.get("hidden_dropout_prob", 0.1),
            "attention_dropout": qformer.get("attention_probs_dropout_prob", 0.1),
        },
        "ln_vision_eps": vision["layer_norm_eps"],  # HF's post_layernorm uses the ViT's epsilon
    }
    if stage == 1:
        out["embed_dim"] = hf.get("image_text_hidden_size", 256)
    return out


def from_pretrained(directory: str | Path, overrides: tuple[str, ...] = (), device: str | torch.device = "cpu"):
    """Our model from a transformers BLIP-2 directory: a `Blip2ForImageTextRetrieval` one gives
    `(Blip2Stage1, tokenizer)`, a `Blip2ForConditionalGeneration` one a `Blip2Stage2` (its LLM built from the
    directory's text config and weights)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} not found: give a transformers BLIP-2 model directory")
    hf_config = json.loads(config_path.read_text())
    architectures = hf_config.get("architectures") or []
    state = _hf_state(directory)
    if "Blip2ForImageTextRetrieval" in architectures:
        from lavis_lite.models.factory import create_model
        from lavis_lite.models.tokenizer import build_tokenizer

        has_tokenizer = any((directory / n).is_file() for n in ("vocab.txt", "tokenizer.json"))
        cfg = merge_config(ModelConfig, [_our_config(hf_config, 1)], [*([f"qformer.tokenizer={directory}"] if has_tokenizer else []), *overrides])
        model, tokenizer = create_model(cfg)
        if tokenizer is not None and tokenizer.bos_token_id is None:
            tokenizer = build_tokenizer(directory)
        ours = from_hf_retrieval(state)
        own = model.state_dict()
        missing = sorted(k for k in own if k not in ours and not NOT_IN_HF.match(k))
        if missing:
            raise ConfigError(f"{directory} lacks {missing[:5]}: not a Blip2ForImageTextRetrieval of this shape")
        model.load_state_dict(ours, strict=False)
        return model.to(device).eval(), tokenizer
    if "Blip2ForConditionalGeneration" in architectures:
        return _stage2_from_pretrained(directory, hf_config, state, overrides, device)
    raise ConfigError(f"{config_path} is a {architectures or 'model'} directory: expected Blip2ForImageTextRetrieval or Blip2ForConditionalGeneration")


def _stage2_from_pretrained(directory: Path, hf_config: dict, state: dict, overrides, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from lavis_lite.models.llm import freeze, prepare_tokenizer

    text_config = AutoConfig.for_model(**hf_config["text_config"])
    loader = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    llm = loader.from_config(text_config)
    llm_state = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
    missing, unexpected = llm.load_state_dict(llm_state, strict=False)
    tied = {n for n in missing if "lm_head" in n or "embed_tokens" in n or n.endswith("shared.weight")}
    if unexpected or set(missing) - tied:
        raise ConfigError(f"{directory}: the LLM's weights do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    llm.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prepare_tokenizer(tokenizer)
    ours_cfg = _our_config(hf_config, 2)
    generation = directory / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(eos, int) and eos != tokenizer.eos_token_id:  # e.g. BLIP-2 OPT's "\n" (50118)
        ours_cfg["llm"] = {"stop_text": tokenizer.decode([eos])}
    cfg = merge_config(Stage2ModelConfig, [ours_cfg], ["llm.precision=fp32", *overrides])
    model = Blip2Stage2(cfg, freeze(llm.eval()), tokenizer)
    ours = from_hf_conditional_generation({k: v for k, v in state.items() if not k.startswith("language_model.")})
    model.load_state_dict(ours, strict=False)
    own = {k for k in model.state_dict() if not k.startswith("llm.")}
    if own - set(ours):
        raise ConfigError(f"{directory} lacks {sorted(own - set(ours))[:5]}: not a Blip2ForConditionalGeneration of this shape")
    return model.to(device).eval()


def save_qformer(model: Union[Blip2Stage1, Blip2Stage2], out: str | Path) -> Path:
    """The Q-Former side of any model, for encoders HF's BLIP-2 cannot hold: `out/qformer.safetensors` (ln_vision,
    query tokens, Q-Former, and the ITC/ITM heads or the LLM projection, under transformers' BLIP-2 names, with
    the vision tower left out) and `out/lavis_lite_config.json` (our model config, encoder included)."""
    out = Path(out)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("vision.", "llm."))}
    hf = to_hf_retrieval(state) if isinstance(model, Blip2Stage1) else to_hf_conditional_generation(state)
    tmp = staging_dir(out)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp / QFORMER_FILE))
    (tmp / "lavis_lite_config.json").write_text(json.dumps(to_dict(model.cfg), indent=2) + "\n")
    replace_dir(tmp, out)
    return out
