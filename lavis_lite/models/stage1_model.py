"""The stage-1 BLIP-2 model: frozen image encoder -> ln_vision -> Q-Former, with ITC, ITM and ITG losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavis_lite.config import ConfigError, ModelConfig
from lavis_lite.distributed import gather_no_grad, gather_padded, gather_with_grad, world
from lavis_lite.models.losses import itc_loss, itg_loss, itm_loss, sample_negatives
from lavis_lite.models.masks import build_attention_mask
from lavis_lite.models.qformer import QFormer
from lavis_lite.models.vision import build_vision_encoder

KNOWN_LOSSES = ("itc", "itm", "itg")


@dataclass
class Stage1Output:
    loss: Tensor
    loss_itc: Optional[Tensor] = None
    loss_itm: Optional[Tensor] = None
    loss_itg: Optional[Tensor] = None


class Blip2Stage1(nn.Module):
    """BLIP-2's first stage (LAVIS `Blip2Qformer`): representation learning against a frozen image encoder.

    Token ids follow the Q-Former tokenizer (`lavis_lite.models.tokenizer`): `[CLS]` first,
    `bos_token_id` is `[DEC]`, which replaces `[CLS]` for the ITG pass.
    """

    def __init__(self, cfg: ModelConfig, bos_token_id: Optional[int] = None, pad_token_id: int = 0):
        super().__init__()
        unknown = sorted(set(cfg.losses) - set(KNOWN_LOSSES))
        if unknown:
            raise ConfigError(f"unknown loss {unknown} in losses={cfg.losses}: choose from {list(KNOWN_LOSSES)}")
        self.cfg = cfg
        self.bos_token_id = cfg.qformer.vocab_size - 1 if bos_token_id is None else bos_token_id
        self.pad_token_id = pad_token_id
        self.vision = build_vision_encoder(cfg.vision)
        width = self.vision.width
        self.ln_vision = nn.LayerNorm(width, eps=cfg.ln_vision_eps)
        self.qformer = QFormer(cfg.qformer, encoder_width=width)
        hidden = cfg.qformer.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.qformer.num_query_tokens, hidden) * 0.02)
        self.vision_proj = nn.Linear(hidden, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temperature))

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    # ---- inference building blocks -------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """Pixels [B,3,H,W] -> `ln_vision(frozen_encoder(images))` [B,N,C]."""
        return self.ln_vision(self.vision(images))

    def image_features(self, image_embeds: Tensor) -> tuple[Tensor, Tensor, list]:
        """Query outputs [B,Q,D], their normalised projections [B,Q,E], and the queries' keys/values."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out, key_values = self.qformer(query_embeds=queries, image_embeds=image_embeds)
        return query_out, F.normalize(self.vision_proj(query_out), dim=-1), key_values

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text outputs [B,T,D] (text-only pass) and the normalised projected `[CLS]` [B,E]."""
        allowed = build_attention_mask("itc", 0, attention_mask)
        text_out, _ = self.qformer(input_ids=input_ids, allowed=allowed)
        return text_out, F.normalize(self.text_proj(text_out[:, 0]), dim=-1)

    @staticmethod
    def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarity [B_img, B_txt]: the best of the image's queries for each text."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)

    def multimodal_features(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Query outputs [B,Q,D] of the joint (ITM, bi-directional) pass over image-text pairs."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        allowed = build_attention_mask("itm", self.num_queries, attention_mask)
        joint, _ = self.qformer(query_embeds=queries, input_ids=input_ids, allowed=allowed, image_embeds=image_embeds)
        return joint[:, : self.num_queries]

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits [B,2] (no match, match) for pairs (image_embeds[i], text i)."""
        return self.itm_head(self.multimodal_features(image_embeds, input_ids, attention_mask)).mean(dim=1)

    # ---- training --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Optional[Tensor] = None,
        vision_tokens: Optional[Tensor] = None,
        sample_ids: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Stage1Output:
        """The summed stage-1 losses for a batch of pairs.

        Give `images` (pixels) or `vision_tokens` (the frozen encoder's output before ln_vision, e.g.
        from a feature cache). `sample_ids` marks pairs that share a caption or an image: with
        `caption_positives`, pairs with equal ids count as positives in ITC and are never drawn as ITM negatives.
        Across processes every rank must hold the same batch size.
        """
        if vision_tokens is None:
            if images is None:
                raise ValueError("give images (pixels) or vision_tokens (frozen encoder tokens)")
            vision_tokens = self.vision(images)
        image_embeds = self.ln_vision(vision_tokens)
        rank, _ = world()
        batch = input_ids.shape[0]
        if sample_ids is None or not self.cfg.caption_positives:
            sample_ids = torch.arange(batch, device=input_ids.device) + rank * batch
        query_out, image_feats, query_key_values = self.image_features(image_embeds)
        text_out, text_feat = self.text_features(input_ids, attention_mask)

        gather = gather_with_grad if self.cfg.itc_gather_with_grad else gather_no_grad
        image_feats_all = gather(image_feats)
        text_feat_all = gather(text_feat)
        ids_all = gather_no_grad(sample_ids)
        positives = sample_ids[:, None] == ids_all[None, :]
        sim_i2t = self.itc_similarity(image_feats, text_feat_all)
        sim_t2i = self.itc_similarity(image_feats_all, text_feat).t()

        losses: dict[str, Tensor] = {}
        if "itc" in self.cfg.losses:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            losses["itc"] = itc_loss(sim_i2t, sim_t2i, positives, self.temp, self.cfg.itc_label_smoothing)
        if "itm" in self.cfg.losses:
            losses["itm"] = self._itm_loss(
                image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, positives, generator,
                _share(batch, self.cfg.itm_batch_fraction),
            )
        if "itg" in self.cfg.losses:
            count = _share(batch, self.cfg.itg_batch_fraction)
            query_key_values = [(k[:count], v[:count]) for k, v in query_key_values]
            losses["itg"] = self._itg_loss(input_ids[:count], attention_mask[:count], query_key_values)
        return Stage1Output(
            loss=sum(losses.values()),
            loss_itc=losses.get("itc"),
            loss_itm=losses.get("itm"),
            loss_itg=losses.get("itg"),
        )

    def _itm_loss(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        sim_i2t: Tensor,
        sim_t2i: Tensor,
        positives: Tensor,
        generator: Optional[torch.Generator],
        count: int,
    ) -> Tensor:
        """ITM over `count` positives, as many hard-negative images and texts drawn from the global batch."""
        image_embeds_all = gather_with_grad(image_embeds)
        input_ids_all = gather_padded(input_ids, self.pad_token_id)
        attention_mask_all = gather_padded(attention_mask, 0)
        image_embeds, input_ids, attention_mask = image_embeds[:count], input_ids[:count], attention_mask[:count]
        with torch.no_grad():
            neg_image = sample_negatives(sim_t2i[:count] / self.temp, positives[:count], generator)
            neg_text = sample_negatives(sim_i2t[:count] / self.temp, positives[:count], generator)
        text_len = max(input_ids.shape[1], input_ids_all.shape[1])
        ids = [F.pad(t, (0, text_len - t.shape[1]), value=self.pad_token_id) for t in (input_ids, input_ids_all)]
        masks = [F.pad(t, (0, text_len - t.shape[1]), value=0) for t in (attention_mask, attention_mask_all)]
        pair_ids = torch.cat([ids[0], ids[0], ids[1][neg_text]])
        pair_mask = torch.cat([masks[0], masks[0], masks[1][neg_text]])
        pair_images = torch.cat([image_embeds, image_embeds_all[neg_image], image_embeds])
        return itm_loss(self.itm_logits(pair_images, pair_ids, pair_mask))

    def _itg_loss(self, input_ids: Tensor, attention_mask: Tensor, query_key_values: list) -> Tensor:
        """Causal LM loss on the text, attending to the image pass's query keys/values."""
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.bos_token_id
        allowed = build_attention_mask("itg", self.num_queries, attention_mask)[:, :, self.num_queries :]
        text_out, _ = self.qformer(input_ids=decoder_ids, allowed=allowed, prefix=query_key_values)
        # Position t predicts token t+1; the vocabulary projection runs on real (non-padding) targets only.
        predicts = attention_mask[:, 1:].bool()
        logits = self.qformer.lm_logits(text_out[:, :-1][predicts])
        return itg_loss(logits, decoder_ids[:, 1:][predicts], self.cfg.itg_label_smoothing)


def _share(batch: int, fraction: float) -> int:
    """How many of a batch's first pairs a loss computed on `fraction` of it sees (at least one)."""
    return max(1, round(batch * fraction))
