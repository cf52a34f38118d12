"""A recipe's image-text data: the training stream (streamed shards, or cached frozen-encoder tokens) and
the held-out split. Shared by both stages; the stage decides how captions become model text."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lavis_lite.config import ConfigError, VisionConfig
from lavis_lite.data.config import DataConfig
from lavis_lite.data.feature_cache import FeatureCache, build_feature_cache, cache_fingerprint, cached_batches, trace_encoder
from lavis_lite.data.samples import Collator, SkipCounter
from lavis_lite.data.webdataset_pipeline import create_wds_loader, list_shards
from lavis_lite.distributed import world

log = logging.getLogger("lavis_lite.data")

TextFields = Callable[[list[str]], dict]  # captions -> the batch's text tensors (input_ids, ...)


@dataclass
class HeldOut:
    """The held-out pairs: image tokens (cached) or a way to compute them, and the captions."""

    captions: list[str]
    tokens: Callable[[], Iterator[Tensor]]  # yields frozen-encoder tokens in caption order, in batches
    keys: list[str]  # the samples' keys in the shards, in caption order


@dataclass
class TrainingData:
    """Batches for `lavis_lite.training.train_loop.train` and the held-out split, from `data` and the frozen `encoder`."""

    data: DataConfig
    vision: VisionConfig
    encoder: nn.Module  # the frozen image encoder (a `FrozenVisionEncoder`)
    tokenizer: PreTrainedTokenizerBase
    max_text_len: int
    skipped: SkipCounter

    def loader(self, shards: str, train: bool, **data_overrides):
        return create_wds_loader(
            shards,
            self.tokenizer,
            dataclasses.replace(self.data, **data_overrides),
            image_size=self.vision.image_size,
            mean=self.encoder.mean,
            std=self.encoder.std,
            max_text_len=self.max_text_len,
            train=train,
        )

    def cache(self, shards: str, split: str) -> FeatureCache:
        """Build (or reuse) the token cache of one split, on the main process; others wait and read it."""
        fingerprint = cache_fingerprint(self.vision, self.vision.image_size, list_shards(shards))
        root = Path(self.data.cache_dir) / f"{split}-{fingerprint}"
        rank, size = world()
        if rank == 0 and not FeatureCache.is_complete(root, fingerprint):
            loader = self.loader(shards, train=False, resampled=False)
            encoder = self.encoder
            on_cpu = not any(p.is_cuda for p in encoder.parameters())
            if self.data.trace_encoder and encoder.traceable and on_cpu:
                image_size = self.vision.image_size
                encoder = trace_encoder(encoder, torch.randn(2, 3, image_size, image_size))
            micro_batch = self.data.cache_micro_batch if on_cpu else None
            build_feature_cache(encoder, loader, root, fingerprint, skipped=self.skipped, micro_batch=micro_batch)
        if size > 1:
            torch.distributed.barrier()
        cache = FeatureCache(root)
        log.info("%s cache %s: %d samples (%s skipped when built)", split, root, len(cache), sum(cache.skipped.values()))
        return cache

    def training_batches(self, text: Optional[TextFields] = None) -> Callable[[int], Iterator[dict]]:
        """`batches(micro_step)`: the training stream positioned at a micro-step (exactly, for cached tokens).

        `text` turns a batch's captions into its text fields (default: the Collator's tokenisation).
        """
        rank, size = world()
        data = self.data
        if data.cache_features:
            cache = self.cache(data.train_shards, "train")
            tokenize = text or Collator(self.tokenizer, self.max_text_len).tokenize

            def from_cache(start: int) -> Iterator[dict]:
                return cached_batches(cache, tokenize, data.batch_size, data.seed, start, rank, size)

            return from_cache

        def streamed(start: int) -> Iterator[dict]:
            # A webdataset stream has no position to seek to: a resumed run continues on a stream re-seeded by
            # its step, so it sees different (equally random) samples than the uninterrupted run would have.
            loader = self.loader(data.train_shards, train=True, seed=data.seed + start)
            batches = _epochs(loader, data.train_shards)
            return batches if text is None else ({**b, **text(b["caption"])} for b in batches)

        return streamed

    def held_out(self, batch_size: int) -> HeldOut:
        """The held-out split, from the token cache, or decoded once and kept in memory (meant for small
        held-out sets like the demo's 1,000 pairs; large benchmarks go through the retrieval evaluator)."""
        if self.data.cache_features:
            cache = self.cache(self.data.val_shards, "val")

            def cached_tokens() -> Iterator[Tensor]:
                for start in range(0, len(cache), batch_size):
                    yield cache.tokens(range(start, min(len(cache), start + batch_size)))

            return HeldOut(cache.captions, cached_tokens, cache.keys)
        loader = self.loader(self.data.val_shards, train=False, resampled=False, num_workers=0, batch_size=batch_size)
        captions: list[str] = []
        keys: list[str] = []
        images: list[Tensor] = []
        for batch in loader:
            self.skipped.update(batch)
            captions += batch["caption"]
            keys += batch["key"]
            images.append(batch["image"])

        def encoded() -> Iterator[Tensor]:
            device = next(self.encoder.parameters()).device
            with torch.no_grad():
                for chunk in images:
                    yield self.encoder(chunk.to(device))

        return HeldOut(captions, encoded, keys)


def _epochs(loader, shards: str) -> Iterator[dict]:
    """Pass after pass over a training loader: training is step-based, and a finite loader
    (`data.resampled=false`) ends after each pass (its shard order is reshuffled for the next)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError(
                f"data.train_shards={shards!r} gave no full batch of data.batch_size samples: "
                "give more training samples or a smaller data.batch_size"
            )
