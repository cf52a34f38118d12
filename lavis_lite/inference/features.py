"""Feature extraction with a stage-1 model, LAVIS style:

    model, vis_processors, txt_processors = load_model_and_preprocess("runs/stage1-demo")
    image = vis_processors["eval"](pil_image)[None]
    text = txt_processors["eval"]("a red circle on the left")
    features = model.extract_features({"image": image, "text_input": [text]}, mode="image")

plus the building blocks that retrieval indexes and re-ranks with (`image_vectors`, `text_vectors`,
`itm_scores`, `checkpoint_id`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import BatchEncoding, PreTrainedTokenizerBase

from lavis_lite.data.feature_cache import trace_encoder
from lavis_lite.data.transforms import clean_caption
from lavis_lite.config import list_models
from lavis_lite.errors import MissingFileError, UserError
from lavis_lite.inference.preprocess import image_processor
from lavis_lite.models.factory import create_model, load_stage1_checkpoint
from lavis_lite.models.stage1_model import Blip2Stage1
from lavis_lite.precision import resolve_dtype

MODES = ("image", "text", "multimodal")
_MODE_INPUTS = {"image": ("image",), "text": ("text_input",), "multimodal": ("image", "text_input")}


@dataclass
class BlipOutputFeatures:
    """LAVIS's feature fields, float32; a field the mode does not compute is None.

    image_embeds [B,Q,D]: query outputs; image_embeds_proj [B,Q,E]: their normalised projections (ITC);
    text_embeds [B,T,D]: text outputs; text_embeds_proj [B,T,E]: normalised projection of every token
    (`[:, 0]` is the ITC text feature); multimodal_embeds [B,Q,D]: query outputs of the joint (ITM) pass.
    """

    image_embeds: Optional[Tensor] = None
    image_embeds_proj: Optional[Tensor] = None
    text_embeds: Optional[Tensor] = None
    text_embeds_proj: Optional[Tensor] = None
    multimodal_embeds: Optional[Tensor] = None


def weights_id(state: Mapping[str, Tensor]) -> str:
    """A short stable hash of a state dict: the first 16 hex digits of sha256 over its names, dtypes,
    shapes and bytes in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def caption_processor(max_words: int = 50) -> Callable[[str], str]:
    """LAVIS's evaluation caption processor without its lowercasing (the tokenizer decides case): the
    punctuation that training captions lose becomes spaces, whitespace runs collapse, `max_words` kept."""

    return functools.partial(clean_caption, max_words=max_words, lowercase=False)


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


class Blip2FeatureExtractor(nn.Module):
    """A stage-1 model and its tokenizer for inference: features, ITC and ITM scores (always eval mode,
    no grad). Inputs move to the model's device; features come back as float32."""

    def __init__(
        self,
        model: Blip2Stage1,
        tokenizer: Optional[PreTrainedTokenizerBase],
        source: str,
        checkpoint_id: Optional[str] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = str(source)
        self.checkpoint_id = checkpoint_id or weights_id(model.state_dict())
        self._traced_vision: dict[torch.dtype, torch.jit.ScriptModule] = {}  # a dict: not a submodule
        # `compile`: the pixels -> ITC feature path through torch.compile (inductor), once per batch shape;
        # inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) makes later processes skip most of that cost.
        self._compiled_image = torch.compile(self._image_path, dynamic=False) if compile else None
        self.train(False)

    def train(self, mode: bool = True) -> Blip2FeatureExtractor:
        """Stay in eval mode (no dropout) whatever `mode` is asked for."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the vision encoder and Q-Former compute in."""
        return self.model.query_tokens.dtype

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    @property
    def num_queries(self) -> int:
        return self.model.num_queries

    @property
    def image_size(self) -> int:
        return self.model.cfg.vision.image_size

    def tokenize(self, texts: str | Sequence[str]) -> BatchEncoding:
        """Token ids and attention mask on the model's device: truncated to `max_text_len`, padded to the
        longest text."""
        if self.tokenizer is None:
            raise UserError(f"{self.source} has no tokenizer: set qformer.tokenizer (or qformer.bert) to use text")
        texts = _as_list(texts)
        if not texts:
            raise UserError("no texts given")
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:
            raise UserError(f"empty text at position(s) {empty[:5]}: every text needs at least one word")
        return self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.model.cfg.max_text_len, return_tensors="pt"
        ).to(self.device)

    # ---- building blocks -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: Tensor) -> Tensor:
        """Pixels [B,3,S,S] -> `ln_vision(frozen encoder tokens)` [B,N,C] in the model's dtype (ITM's input)."""
        images = images.to(self.device)
        return self.model.ln_vision(self._vision_encoder(images)(images).to(self.dtype))

    @torch.inference_mode()
    def image_vectors(self, images: Optional[Tensor] = None, image_embeds: Optional[Tensor] = None) -> Tensor:
        """The ITC image feature [B,Q,E], float32, normalised, from pixels or from `encode_images`' output."""
        if self._compiled_image is not None and images is not None and image_embeds is None:
            return self._compiled_image(images.to(self.device))[1].float()
        return self.model.image_features(self._image_embeds(images, image_embeds))[1].float()

    def _image_path(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels -> (query outputs, their normalised ITC projections), the path `compile` compiles."""
        return self.model.image_features(self.model.ln_vision(self.model.vision(images).to(self.dtype)))[:2]

    @torch.inference_mode()
    def text_vectors(self, texts: str | Sequence[str]) -> Tensor:
        """The ITC text feature [B,E] (normalised projected `[CLS]`), float32."""
        tokens = self.tokenize(texts)
        return self.model.text_features(tokens.input_ids, tokens.attention_mask)[1].float()

    @torch.inference_mode()
    def itc_scores(
        self, images: Optional[Tensor] = None, texts: str | Sequence[str] = (), image_embeds: Optional[Tensor] = None
    ) -> Tensor:
        """Cosine similarity [B_img, B_txt]: for each pair, the best of the image's queries."""
        return self.model.itc_similarity(self.image_vectors(images, image_embeds), self.text_vectors(texts))

    @torch.inference_mode()
    def itm_scores(
        self, images: Optional[Tensor] = None, texts: str | Sequence[str] = (), image_embeds: Optional[Tensor] = None
    ) -> Tensor:
        """ITM "match" logits [B] of pairs (image i, text i), float32; one image is paired with every text.
        Give pixels or `encode_images`' output (`image_embeds`)."""
        tokens = self.tokenize(texts)
        embeds = self._paired(self._image_embeds(images, image_embeds), len(tokens.input_ids))
        return self.model.itm_logits(embeds, tokens.input_ids, tokens.attention_mask)[:, 1].float()

    # ---- LAVIS's interface -------------------------------------------------------------------------
    @torch.inference_mode()
    def extract_features(self, samples: Mapping[str, object], mode: str = "multimodal") -> BlipOutputFeatures:
        """LAVIS's `extract_features`: mode "image" needs samples["image"] (pixels [B,3,S,S]), "text" needs
        samples["text_input"] (strings), "multimodal" needs both (one image per text, or one for all)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
        for key in _MODE_INPUTS[mode]:
            if samples.get(key) is None:
                raise ValueError(f"mode '{mode}' needs samples['{key}'] (inputs given: {sorted(samples)})")
        if mode == "image":
            if self._compiled_image is not None:
                query_out, query_proj = self._compiled_image(samples["image"].to(self.device))
            else:
                query_out, query_proj, _ = self.model.image_features(self.encode_images(samples["image"]))
            return BlipOutputFeatures(image_embeds=query_out.float(), image_embeds_proj=query_proj.float())
        tokens = self.tokenize(samples["text_input"])
        if mode == "text":
            text_out, _ = self.model.text_features(tokens.input_ids, tokens.attention_mask)
            text_proj = F.normalize(self.model.text_proj(text_out), dim=-1)
            return BlipOutputFeatures(text_embeds=text_out.float(), text_embeds_proj=text_proj.float())
        embeds = self._paired(self.encode_images(samples["image"]), len(tokens.input_ids))
        joint = self.model.multimodal_features(embeds, tokens.input_ids, tokens.attention_mask)
        return BlipOutputFeatures(multimodal_embeds=joint.float())

    # ---- helpers -------------------------------------------------------------------------------------
    def _vision_encoder(self, example: Tensor) -> Callable[[Tensor], Tensor]:
        """The frozen encoder; on CPU a traceable one (a CNN) is traced and frozen on first use, as the
        feature cache does (faster; features within 1e-6 of eager)."""
        vision = self.model.vision
        if not vision.traceable or self.device.type != "cpu":
            return vision
        if self.dtype not in self._traced_vision:
            self._traced_vision[self.dtype] = trace_encoder(vision, example)
        return self._traced_vision[self.dtype]

    def _image_embeds(self, images: Optional[Tensor], image_embeds: Optional[Tensor]) -> Tensor:
        if (images is None) == (image_embeds is None):
            raise ValueError("give exactly one of images (pixels [B,3,S,S]) and image_embeds (encode_images' output)")
        if image_embeds is None:
            return self.encode_images(images)
        return image_embeds.to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _paired(image_embeds: Tensor, num_texts: int) -> Tensor:
        """Image tokens for `num_texts` pairs: one per text as given, or one image repeated for every text."""
        if len(image_embeds) == num_texts:
            return image_embeds
        if len(image_embeds) == 1:
            return image_embeds.expand(num_texts, -1, -1)
        raise ValueError(f"{len(image_embeds)} images for {num_texts} texts: give one image per text, or one image")


def load_model_and_preprocess(
    name: str | Path,
    model_type: Optional[str] = None,
    is_eval: bool = True,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    overrides: Sequence[str] = (),
    weights_dir: Optional[str | Path] = None,
    compile: bool = False,
) -> tuple[Blip2FeatureExtractor, dict[str, Callable[[Image.Image], Tensor]], dict[str, Callable[[str], str]]]:
    """A feature extractor and its image and text processors (`{"eval": ...}`), LAVIS style.

    `name`: a stage-1 run or checkpoint directory (trained weights), a model config name under configs/model/
    or YAML path (untrained), or one of LAVIS's model names with its `model_type` (`blip2_feature_extractor`
    / `pretrain`, `blip2_image_text_matching`, `blip2_opt` / `pretrain_opt2.7b`, `blip2_t5`, ...: see
    `lavis_lite.interop.lavis_api`; LAVIS's weight files are read from `weights_dir`). `dtype` (default:
    `auto`, see `lavis_lite.precision`) is what the vision encoder and Q-Former compute in; `overrides` apply
    to the model config (attention defaults to SDPA). The model is built in fp32, identified by
    `checkpoint_id` (independent of dtype and device), then cast once. Models are returned in eval mode
    (`is_eval` is accepted for LAVIS's signature). `compile=True` runs the image path through torch.compile
    (faster once compiled; the first batch of each shape pays the compilation).
    """
    from lavis_lite.interop import lavis_api

    if lavis_api.is_lavis_name(str(name)):
        return lavis_api.load(str(name), model_type, device, weights_dir, overrides)
    if str(name).endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise UserError(
            f"{name} is a weights file: give a run directory, a model config name with its weights "
            f"(overrides=['lavis_checkpoint={name}'] for LAVIS's .pth), or LAVIS's name and model_type "
            "(e.g. name='blip2_feature_extractor', model_type='pretrain')"
        )
    name_or_checkpoint = name
    device = torch.device(device)
    dtype = resolve_dtype("auto", device) if dtype is None else dtype
    # No backward pass here: SDPA, unlike for training on CPU, is the faster attention (unless overridden).
    overrides = ["qformer.attn_impl=sdpa", *overrides, "vision.precision=fp32"]
    if not Path(name_or_checkpoint).exists() and (os.sep in str(name_or_checkpoint) or str(name_or_checkpoint).startswith(".")):
        raise MissingFileError(
            f"checkpoint {name_or_checkpoint} does not exist: give a stage-1 run directory, one of its "
            f"checkpoints/step-N directories, or a model config name ({', '.join(list_models())})"
        )
    if Path(name_or_checkpoint).is_dir():
        model, tokenizer = load_stage1_checkpoint(name_or_checkpoint, overrides)
    else:
        model, tokenizer = create_model(name_or_checkpoint, overrides)
    checkpoint_id = weights_id(model.state_dict())
    model.to(device=device, dtype=dtype)
    extractor = Blip2FeatureExtractor(model, tokenizer, str(name_or_checkpoint), checkpoint_id, compile=compile)
    return extractor, {"eval": image_processor(model)}, {"eval": caption_processor()}
