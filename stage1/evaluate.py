"""Held-out retrieval of a stage-1 model: recall@1/5/10 both ways, ITC ranking with optional ITM re-ranking."""

from __future__ import annotations

import torch

from lavis_lite.data.training_data import HeldOut
from lavis_lite.evaluation.query_diversity import query_similarity
from lavis_lite.evaluation.retrieval_metrics import evaluate_similarity
from lavis_lite.models.stage1_model import Blip2Stage1

from .config import EvalConfig


@torch.no_grad()
def evaluate_retrieval(model: Blip2Stage1, tokenizer, held: HeldOut, cfg: EvalConfig, max_text_len: int) -> dict:
    """Metrics as fractions in [0, 1] (`t2i_r1`, ..., `i2t_r10`, `*_r1_caption`), chance levels, and the mean
    cosine between the query outputs of one image (`query_cosine`: 1.0 when they collapsed into one vector)
    and between images for the same query (`query_cosine_across_images`)."""
    device = model.query_tokens.device
    image_embeds, image_feats, text_feats, query_out = [], [], [], []
    for chunk in held.tokens():
        embeds = model.ln_vision(chunk.to(device))
        outputs, feats, _ = model.image_features(embeds)
        query_out.append(outputs.float().cpu())
        image_feats.append(feats.float())
        if cfg.itm_rerank_k:
            image_embeds.append(embeds)
    for start in range(0, len(held.captions), cfg.batch_size):
        batch = tokenizer(
            held.captions[start : start + cfg.batch_size],
            padding="longest", truncation=True, max_length=max_text_len, return_tensors="pt",
        ).to(device)
        text_feats.append(model.text_features(batch.input_ids, batch.attention_mask)[1].float())
    sim = model.itc_similarity(torch.cat(image_feats), torch.cat(text_feats)).cpu()
    count = sim.shape[0]
    itm = None
    if cfg.itm_rerank_k:
        embeds = torch.cat(image_embeds)
        flat = tokenizer(held.captions, padding="longest", truncation=True, max_length=max_text_len, return_tensors="pt").to(device)

        def itm(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            logits = model.itm_logits(embeds[images.to(device)], flat.input_ids[texts.to(device)], flat.attention_mask[texts.to(device)])
            return logits[:, 1].float().cpu()

    pairs = [[i] for i in range(count)], list(range(count))
    metrics = evaluate_similarity(sim, *pairs, rerank_k=cfg.itm_rerank_k, itm_scores=itm, captions=held.captions)
    within_image, across_images = query_similarity(torch.cat(query_out))
    return {**metrics, "query_cosine": within_image, "query_cosine_across_images": across_images}
