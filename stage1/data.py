"""Stage-1 data: training batches (streamed shards, or cached frozen-encoder tokens) and the held-out set."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from lavis_lite.data import Collator, SkipCounter, create_wds_loader, list_shards
from lavis_lite.distributed import world
from lavis_lite.feature_cache import (
    FeatureCache,
    build_feature_cache,
    cached_batches,
    cache_fingerprint,
    trace_encoder,
)
from lavis_lite.stage1_model import Blip2Stage1

from .config import Stage1Config

log = logging.getLogger("lavis_lite.stage1")


@dataclass
class HeldOut:
    """The held-out pairs: image tokens (cached) or a way to compute them, and the captions."""

    captions: list[str]
    tokens: Optional[Callable[[], Iterator[Tensor]]]  # yields frozen-encoder tokens in caption order


def _loader(cfg: Stage1Config, model: Blip2Stage1, tokenizer, shards: str, train: bool, **data_overrides):
    data = dataclasses.replace(cfg.data, **data_overrides)
    return create_wds_loader(
        shards,
        tokenizer,
        data,
        image_size=cfg.model.vision.image_size,
        mean=model.vision.mean,
        std=model.vision.std,
        max_text_len=cfg.model.max_text_len,
        train=train,
    )


def _cache(cfg: Stage1Config, model: Blip2Stage1, tokenizer, shards: str, split: str, skipped: SkipCounter) -> FeatureCache:
    """Build (or reuse) the token cache of one split, on the main process; others wait and read it."""
    fingerprint = cache_fingerprint(cfg.model.vision, cfg.model.vision.image_size, list_shards(shards))
    root = Path(cfg.data.cache_dir) / f"{split}-{fingerprint}"
    rank, size = world()
    if rank == 0 and not FeatureCache.is_complete(root, fingerprint):
        loader = _loader(cfg, model, tokenizer, shards, train=False, resampled=False)
        image_size = cfg.model.vision.image_size
        encoder = model.vision
        if cfg.data.trace_encoder and encoder.traceable and not any(p.is_cuda for p in encoder.parameters()):
            encoder = trace_encoder(encoder, torch.randn(2, 3, image_size, image_size))
        build_feature_cache(encoder, loader, root, fingerprint, skipped=skipped)
    if size > 1:
        torch.distributed.barrier()
    cache = FeatureCache(root)
    log.info("%s cache %s: %d samples (%s skipped when built)", split, root, len(cache), sum(cache.skipped.values()))
    return cache


def training_batches(
    cfg: Stage1Config, model: Blip2Stage1, tokenizer, skipped: SkipCounter
) -> Callable[[int], Iterator[dict]]:
    """`batches(micro_step)`: the training stream positioned at a micro-step (exactly, for cached tokens)."""
    rank, size = world()
    if cfg.data.cache_features:
        cache = _cache(cfg, model, tokenizer, cfg.data.train_shards, "train", skipped)
        collate = Collator(tokenizer, cfg.model.max_text_len)

        def from_cache(start: int) -> Iterator[dict]:
            return cached_batches(cache, collate.tokenize, cfg.data.batch_size, cfg.data.seed, start, rank, size)

        return from_cache

    def streamed(start: int) -> Iterator[dict]:
        # A webdataset stream has no position to seek to: a resumed run continues on a stream re-seeded by
        # its step, so it sees different (equally random) samples than the uninterrupted run would have.
        return iter(_loader(cfg, model, tokenizer, cfg.data.train_shards, train=True, seed=cfg.data.seed + start))

    return streamed


def held_out(cfg: Stage1Config, model: Blip2Stage1, tokenizer, skipped: SkipCounter) -> HeldOut:
    """The held-out split, from the token cache, or decoded once and kept in memory (meant for small
    held-out sets like the demo's 1,000 pairs; large benchmarks go through the retrieval evaluator)."""
    if cfg.data.cache_features:
        cache = _cache(cfg, model, tokenizer, cfg.data.val_shards, "val", skipped)

        def cached_tokens() -> Iterator[Tensor]:
            for start in range(0, len(cache), cfg.eval.batch_size):
                yield cache.tokens(range(start, min(len(cache), start + cfg.eval.batch_size)))

        return HeldOut(cache.captions, cached_tokens)
    loader = _loader(cfg, model, tokenizer, cfg.data.val_shards, train=False, resampled=False, num_workers=0)
    captions: list[str] = []
    images: list[Tensor] = []
    for batch in loader:
        captions += batch["caption"]
        images.append(batch["image"])

    def encoded() -> Iterator[Tensor]:
        device = model.query_tokens.device
        for chunk in images:
            yield model.vision(chunk.to(device))

    return HeldOut(captions, encoded)
