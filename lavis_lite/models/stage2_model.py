"""The stage-2 BLIP-2 model: frozen image encoder -> ln_vision -> Q-Former queries -> Linear -> frozen LLM.

The query outputs, mapped to the LLM's width, are prepended to the LLM's input embeddings as soft prompts.
Decoder-only LLMs (OPT, Llama, any `AutoModelForCausalLM`) read `[soft prompts] [BOS] prompt caption [EOS]`
and are trained on the caption only; encoder-decoder LLMs (T5 / FlanT5) read `[soft prompts] prefix [EOS]`
in the encoder and predict the suffix with the decoder (BLIP-2's prefix LM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lavis_lite.config import ConfigError, Stage2ModelConfig
from lavis_lite.models.llm import padded_prompt_ids, stop_token_id
from lavis_lite.models.losses import lm_loss
from lavis_lite.models.qformer import QFormer
from lavis_lite.models.vision import build_vision_encoder

PROJECTION_INITS = ("default", "mean_token")  # Stage2ModelConfig.projection_init


@dataclass
class Stage2Output:
    loss: Tensor
    logits: Tensor  # decoder-only: over the text positions [B, T, V]; encoder-decoder: the decoder's [B, T', V]


class Blip2Stage2(nn.Module):
    """BLIP-2's second stage (LAVIS `Blip2OPT` / `Blip2T5`): the Q-Former bridged to a frozen LLM."""

    def __init__(self, cfg: Stage2ModelConfig, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision_encoder(cfg.vision)
        width = self.vision.width
        self.ln_vision = nn.LayerNorm(width, eps=cfg.ln_vision_eps)
        self.qformer = QFormer(cfg.qformer, encoder_width=width, with_text=False)
        hidden = cfg.qformer.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.qformer.num_query_tokens, hidden) * 0.02)
        self.language_projection = nn.Linear(hidden, llm.get_input_embeddings().embedding_dim)
        if cfg.projection_init not in PROJECTION_INITS:
            raise ConfigError(f"projection_init='{cfg.projection_init}' is not one of {list(PROJECTION_INITS)}")
        if cfg.projection_init == "mean_token":
            # nn.Linear's random weights turn informative query outputs into a different noise prompt per image,
            # which the frozen LLM reads before the Linear has learnt anything.
            with torch.no_grad():
                self.language_projection.weight.zero_()
                self.language_projection.bias.copy_(llm.get_input_embeddings().weight.float().mean(dim=0))
        self.llm = llm
        self.tokenizer = tokenizer
        self.stop_token_id = stop_token_id(tokenizer, cfg.llm.stop_text)  # captions end with it; generation stops there

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.llm.config.is_encoder_decoder)

    def train(self, mode: bool = True) -> "Blip2Stage2":
        super().train(mode)
        self.llm.eval()  # frozen: no dropout, ever
        return self

    # ---- building blocks ---------------------------------------------------------------------------
    def encode_vision(self, images: Tensor) -> Tensor:
        """Pixels [B,3,H,W] -> frozen encoder tokens [B,N,C] (before ln_vision, as the feature cache holds)."""
        return self.vision(images)

    def query_outputs(self, vision_tokens: Tensor) -> Tensor:
        """Frozen encoder tokens [B,N,C] -> the Q-Former's query outputs [B,Q,H]."""
        image_embeds = self.ln_vision(vision_tokens)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, image_embeds=image_embeds)[0]

    def soft_prompts(self, vision_tokens: Tensor) -> Tensor:
        """Frozen encoder tokens [B,N,C] -> the LLM's soft prompts [B,Q,W] (in the LLM's dtype)."""
        return self.language_projection(self.query_outputs(vision_tokens)).to(self.llm.dtype)

    def _vision_tokens(self, images: Optional[Tensor], vision_tokens: Optional[Tensor]) -> Optional[Tensor]:
        if vision_tokens is None and images is not None:
            vision_tokens = self.encode_vision(images)
        return vision_tokens

    # ---- training --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        images: Optional[Tensor] = None,
        vision_tokens: Optional[Tensor] = None,
    ) -> Stage2Output:
        """LM loss of a batch laid out by `lavis_lite.models.llm.lm_inputs` (IGNORE-labelled positions carry none).

        Give `images` (pixels) or `vision_tokens` (frozen encoder tokens, e.g. from a feature cache).
        """
        vision_tokens = self._vision_tokens(images, vision_tokens)
        if vision_tokens is None:
            raise ValueError("give images (pixels) or vision_tokens (frozen encoder tokens)")
        soft = self.soft_prompts(vision_tokens)
        text = self.llm.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([soft, text], dim=1)
        mask = torch.cat([attention_mask.new_ones(soft.shape[:2]), attention_mask], dim=1)
        if self.is_encoder_decoder:
            out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels)
            return Stage2Output(out.loss, out.logits)
        # Position t predicts token t + 1: the last query predicts the first text token (a caption word where
        # there is neither BOS nor prompt), the text positions the rest.
        keep = input_ids.shape[1] + 1
        # Models that ignore `logits_to_keep` (OPT before transformers 5) return every position: keep the last.
        logits = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, logits_to_keep=keep).logits[:, -keep:]
        return Stage2Output(lm_loss(logits[:, :-1], labels), logits[:, 1:])

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Optional[Tensor] = None,
        prompt: Optional[str | Sequence[str]] = None,
        vision_tokens: Optional[Tensor] = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 1,
        do_sample: bool = False,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        batch_size: Optional[int] = None,
    ) -> list[str]:
        """Captions (or answers, with prompts like "Question: {} Answer:") for a batch of images.

        `prompt`: None (the config's prompt), one string for all images, or one per image. Without images
        (and with `batch_size` or a list of prompts) the LLM answers from the prompt alone, the no-image
        baseline. Returns `num_captions` strings per image, image by image.
        """
        vision_tokens = self._vision_tokens(images, vision_tokens)
        if vision_tokens is not None:
            count = vision_tokens.shape[0]
        elif batch_size is not None:
            count = batch_size
        else:
            count = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        prompts = self._prompts(prompt, count)
        device = self.language_projection.weight.device
        ids, mask = padded_prompt_ids(self.tokenizer, self.is_encoder_decoder, prompts, self.cfg.max_text_len)
        ids, mask = ids.to(device), mask.to(device)
        if vision_tokens is None and not mask.sum(dim=1).all():
            ids, mask = self._start_empty_rows(ids, mask)
        inputs_embeds = self.llm.get_input_embeddings()(ids)
        if vision_tokens is not None:
            soft = self.soft_prompts(vision_tokens.to(device))
            inputs_embeds, mask = _prepend(soft, inputs_embeds, mask, left_padded=not self.is_encoder_decoder)
        sampling = {"top_p": top_p, "temperature": temperature} if do_sample else {}
        out = self.llm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_return_sequences=num_captions,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_token_id,
            **sampling,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _start_empty_rows(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Without an image an empty prompt leaves nothing to continue: such rows start from BOS (else EOS).
        A column is added on the left: padding for the other rows, the start token (right-aligned) for these."""
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        empty = mask.sum(dim=1) == 0
        ids = torch.cat([torch.full_like(ids[:, :1], self.tokenizer.pad_token_id), ids], dim=1)
        mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
        ids[empty, -1], mask[empty, -1] = start, 1
        return ids, mask

    def _prompts(self, prompt: Optional[str | Sequence[str]], count: int) -> list[str]:
        if prompt is None:
            prompt = self.cfg.prompt
        if isinstance(prompt, str):
            return [prompt] * count
        prompts = list(prompt)
        if len(prompts) != count:
            raise ValueError(f"{len(prompts)} prompts for {count} images: give one prompt, or one per image")
        return prompts


def _prepend(soft: Tensor, text: Tensor, mask: Tensor, left_padded: bool) -> tuple[Tensor, Tensor]:
    """`[soft ; text]` with its attention mask. Left-padded text keeps its padding in front of the soft
    prompts, so that every row ends at its last prompt token (batched generation = one-by-one)."""
    batch, queries = soft.shape[:2]
    ones = mask.new_ones(batch, queries)
    if not left_padded:
        return torch.cat([soft, text.to(soft.dtype)], dim=1), torch.cat([ones, mask], dim=1)
    length = mask.shape[1]
    pads = (mask == 0).sum(dim=1, keepdim=True)
    j = torch.arange(queries + length, device=mask.device)[None]
    # Index into cat([soft, text]): row pads (text slot 0, itself a pad), then the queries, then the text.
    source = torch.where(j < pads, queries, torch.where(j < pads + queries, j - pads, j))
    combined = torch.cat([soft, text.to(soft.dtype)], dim=1)
    gathered = combined.gather(1, source[..., None].expand(-1, -1, combined.shape[-1]))
    return gathered, (j >= pads).to(mask.dtype)
