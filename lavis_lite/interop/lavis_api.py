"""LAVIS's model names and calls, for code written against `lavis.models`: change only the import.

    from lavis_lite import load_model_and_preprocess
    model, vis_processors, txt_processors = load_model_and_preprocess(
        name="blip2_feature_extractor", model_type="pretrain", is_eval=True, device="cpu")

A LAVIS (name, model_type) resolves to one of our configs plus LAVIS's weight files in a local model
directory: the `weights_dir` argument, else `$LAVIS_LITE_WEIGHTS`, else `weights/`. A missing file is an
error that says which file to put where and where LAVIS publishes it. A `<config>.yaml` in that directory
(e.g. `blip2-lavis-vitg.yaml`) replaces the packaged architecture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lavis_lite.errors import MissingFileError

LAVIS_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"


@dataclass(frozen=True)
class LavisModel:
    config: str  # our model config (packaged name)
    checkpoint: str  # LAVIS's file of the trained weights
    stage: int = 1
    vit: Optional[str] = "eva_vit_g.pth"  # LAVIS's EVA ViT-g, shipped apart (None: the checkpoint holds it)
    llm: Optional[str] = None  # stage 2: the LLM's transformers directory
    bert: Optional[str] = "bert-base-uncased"  # stage 1: the Q-Former's tokenizer directory


_FEATURES = {"pretrain": LavisModel("blip2-lavis-vitg", "blip2_pretrained.pth"),
             "coco": LavisModel("blip2-lavis-vitg", "blip2_finetune_coco.pth", vit=None)}
MODELS: dict[tuple[str, str], LavisModel] = {
    **{("blip2_feature_extractor", t): m for t, m in _FEATURES.items()},
    **{("blip2_image_text_matching", t): m for t, m in _FEATURES.items()},
    **{("blip2", t): m for t, m in _FEATURES.items()},
    ("blip2_opt", "pretrain_opt2.7b"): LavisModel("blip2-lavis-opt2.7b", "blip2_pretrained_opt2.7b.pth", 2, llm="opt-2.7b", bert=None),
    ("blip2_opt", "caption_coco_opt2.7b"): LavisModel("blip2-lavis-opt2.7b", "blip2_caption_opt2.7b.pth", 2, llm="opt-2.7b", bert=None),
    ("blip2_t5", "pretrain_flant5xl"): LavisModel("blip2-lavis-flant5xl", "blip2_pretrained_flant5xl.pth", 2, llm="flan-t5-xl", bert=None),
    ("blip2_t5", "caption_coco_flant5xl"): LavisModel("blip2-lavis-flant5xl", "blip2_caption_flant5xl.pth", 2, llm="flan-t5-xl", bert=None),
}
DEFAULT_TYPES = {"blip2_feature_extractor": "pretrain", "blip2_image_text_matching": "pretrain", "blip2": "pretrain",
                 "blip2_opt": "pretrain_opt2.7b", "blip2_t5": "pretrain_flant5xl"}
LLM_SOURCES = {"opt-2.7b": "facebook/opt-2.7b", "flan-t5-xl": "google/flan-t5-xl"}


def is_lavis_name(name: str) -> bool:
    return name in DEFAULT_TYPES


def weights_dir(given: Optional[str | Path] = None) -> Path:
    return Path(given or os.environ.get("LAVIS_LITE_WEIGHTS") or "weights")


def _file(root: Path, name: str, what: str, source: str) -> str:
    path = root / name
    if not path.exists():
        raise MissingFileError(f"{what} not found: put {name} in {root} (from {source}), or point $LAVIS_LITE_WEIGHTS at the folder that holds it")
    return str(path)


def resolve(name: str, model_type: Optional[str], root: Path) -> tuple[LavisModel, str, list[str]]:
    """The LAVIS model, our config (a name or the directory's YAML) and the overrides that point at its files."""
    model_type = model_type or DEFAULT_TYPES[name]
    entry = MODELS.get((name, model_type))
    if entry is None:
        known = sorted(t for n, t in MODELS if n == name)
        raise MissingFileError(f"LAVIS model {name!r} has no model_type {model_type!r} here: choose one of {known}")
    config = str(root / f"{entry.config}.yaml") if (root / f"{entry.config}.yaml").is_file() else entry.config
    overrides = [f"lavis_checkpoint={_file(root, entry.checkpoint, 'LAVIS checkpoint', LAVIS_URL + entry.checkpoint)}",
                 "qformer.bert=null"]
    if entry.vit:
        overrides.append(f"vision.checkpoint={_file(root, entry.vit, 'EVA ViT-g weights', LAVIS_URL + entry.vit)}")
    if entry.bert:
        overrides.append(f"qformer.tokenizer={_file(root, entry.bert, 'the Q-Former tokenizer', 'huggingface.co/bert-base-uncased')}")
    if entry.llm:
        overrides.append(f"llm.path={_file(root, entry.llm, 'the LLM', 'huggingface.co/' + LLM_SOURCES[entry.llm])}")
    return entry, config, overrides


class LavisBlip2(nn.Module):
    """A stage-1 model answering LAVIS's `Blip2Qformer` / `Blip2ITM` calls: `extract_features(samples, mode)`
    and `model(samples, match_head="itm" | "itc")`."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def extract_features(self, samples: Mapping[str, Any], mode: str = "multimodal"):
        return self.extractor.extract_features(samples, mode)

    @torch.inference_mode()
    def forward(self, samples: Mapping[str, Any], match_head: str = "itm") -> Tensor:
        """itm: logits [B, 2] (no match, match) of image i with text i; itc: cosine similarity [B, 1] of the pairs
        (the best of the image's queries), as LAVIS's `Blip2ITM.forward`."""
        images, texts = samples["image"], samples["text_input"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        model, tokens = self.extractor.model, self.extractor.tokenize(texts)
        embeds = self.extractor._paired(self.extractor.encode_images(images), len(texts))
        if match_head == "itm":
            return model.itm_logits(embeds, tokens.input_ids, tokens.attention_mask).float()
        if match_head == "itc":
            _, image_feats, _ = model.image_features(embeds)
            _, text_feats = model.text_features(tokens.input_ids, tokens.attention_mask)
            return (image_feats @ text_feats.unsqueeze(-1)).amax(dim=1).float()
        raise ValueError(f"match_head={match_head!r}: choose 'itm' or 'itc'")


class LavisCaptioner(nn.Module):
    """A stage-2 model answering LAVIS's `Blip2OPT` / `Blip2T5.generate(samples, ...)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def generate(
        self,
        samples: Mapping[str, Any],
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
    ) -> list[str]:
        return self.model.generate(
            samples["image"], prompt=samples.get("prompt"), num_beams=num_beams, max_new_tokens=max_length,
            min_new_tokens=min_length, do_sample=use_nucleus_sampling, top_p=top_p, temperature=temperature,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, num_captions=num_captions,
        )


def load(name: str, model_type: Optional[str], device: str | torch.device, weights: Optional[str | Path], overrides: Sequence[str]):
    """LAVIS's (model, vis_processors, txt_processors) for a LAVIS name and model type."""
    from lavis_lite.inference.features import caption_processor, load_model_and_preprocess
    from lavis_lite.inference.preprocess import image_processor
    from lavis_lite.models.factory import create_stage2_model

    entry, config, files = resolve(name, model_type, weights_dir(weights))
    if entry.stage == 2:
        model = create_stage2_model(config, [*files, *overrides], device=device)
        return LavisCaptioner(model), {"eval": image_processor(model)}, {"eval": caption_processor()}
    extractor, vis, txt = load_model_and_preprocess(config, device=device, overrides=[*files, *overrides])
    return LavisBlip2(extractor), vis, txt
