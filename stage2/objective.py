"""The stage-2 objective: the frozen LLM's LM loss on the caption, given the soft prompts of the image."""

from __future__ import annotations

import random
import zlib
from typing import Callable

from torch import Tensor, nn

from lavis_lite.models.llm import lm_inputs, split_prefix
from lavis_lite.models.stage2_model import Blip2Stage2


def stage2_loss(model: nn.Module, batch: dict) -> dict[str, Tensor]:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        images=batch.get("image"),
        vision_tokens=batch.get("vision_tokens"),
    )
    return {"loss": out.loss}


def caption_text(model: Blip2Stage2, seed: int) -> Callable[[list[str]], dict]:
    """Captions -> LLM text fields. Decoder-only: `prompt caption`, loss on the caption. Encoder-decoder:
    BLIP-2's prefix LM, each caption cut at a random word (drawn from the batch's content and the seed, so a
    resumed run cuts as the uninterrupted one did) into `prompt prefix` for the encoder and the suffix."""
    prompt = model.cfg.prompt
    max_len = model.cfg.max_text_len

    def text(captions: list[str]) -> dict:
        if not model.is_encoder_decoder:
            return lm_inputs(model.tokenizer, False, [prompt] * len(captions), captions, max_len, model.stop_token_id)
        rng = random.Random(zlib.crc32("\n".join(captions).encode()) + seed)
        sources, targets = zip(*(split_prefix(c, rng) for c in captions))
        sources = [f"{prompt} {s}".strip() for s in sources]
        return lm_inputs(model.tokenizer, True, sources, list(targets), max_len, model.stop_token_id)

    return text
