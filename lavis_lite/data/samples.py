"""Decoded samples, skipped samples and their counts, and batching (shared by every data source)."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from lavis_lite.data.transforms import ImageError, ImageTooLarge, PairTransform, decode_image

logger = logging.getLogger("lavis_lite.data")

# Why a sample was skipped (the keys of `batch["skipped"]`).
CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
IMAGE_TOO_LARGE = "image_too_large"
UNSUPPORTED_FILE = "unsupported_file"  # a file of an image folder that is not an image we read (.ico, .svg, ...)
READ_ERROR = "read_error"  # one per unreadable shard or tar member; the samples it held are not counted


@dataclass(frozen=True)
class Sample:
    """One decoded pair: a transformed image and its cleaned caption."""

    image: torch.Tensor
    caption: str
    key: str


@dataclass(frozen=True)
class Skip:
    """A sample that could not be used, and why (one of the reason constants above)."""

    key: str
    reason: str


def caption_id(caption: str) -> int:
    """A stable 63-bit id of a cleaned caption: equal captions get equal ids in every process and run."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def make_sample(
    key: str, image: Union[bytes, str, None], caption: Optional[str], transform: PairTransform
) -> Sample | Skip:
    """Decode image bytes (or open a file path) to RGB, clean the caption and transform both.

    Checks the caption first, so samples without one cost no image decode.
    """
    if caption is None:
        return Skip(key, MISSING_CAPTION)
    caption = transform.clean(caption)
    if not caption:
        return Skip(key, EMPTY_CAPTION)
    if image is None:
        return Skip(key, MISSING_IMAGE)
    try:
        rgb = decode_image(image, key, transform.max_pixels)
    except FileNotFoundError:
        return Skip(key, MISSING_IMAGE)
    except ImageTooLarge:
        return Skip(key, IMAGE_TOO_LARGE)
    except ImageError:
        return Skip(key, CORRUPT_IMAGE)
    pixels, caption = transform(rgb, caption)
    return Sample(pixels, caption, key)


class SkipLog:
    """Logs skips at WARNING: the first `first` of each reason, then only at powers of two of its count."""

    def __init__(self, first: int = 10) -> None:
        self.first = first
        self.counts: Counter[str] = Counter()

    def __call__(self, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        n = self.counts[skip.reason]
        if n <= self.first:
            logger.warning("skipped sample %r: %s", skip.key, skip.reason)
        elif n & (n - 1) == 0:
            logger.warning("skipped sample %r: %s (%d so far in this process)", skip.key, skip.reason, n)


class SkipCounter:
    """Main-process totals of skipped samples, summed from `batch["skipped"]` across workers."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add a batch's skip counts (its "skipped" mapping; batches from a feature cache have none)."""
        self.counts.update(batch.get("skipped", {}))

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return {reason: n for reason, n in sorted(self.counts.items()) if n}

    def state_dict(self) -> dict[str, int]:
        return self.as_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.counts = Counter(state)

    def summary(self) -> str:
        """One line, e.g. "skipped 3 samples: corrupt_image=1, empty_caption=1, missing_caption=1"."""
        parts = ", ".join(f"{reason}={n}" for reason, n in self.as_dict().items())
        return f"skipped {self.total} samples" + (f": {parts}" if parts else "")


class Collator:
    """Stacks samples into a batch dict; tokenises captions, padded to the batch's longest (<= max_text_len).

    Batch: `image` [B,3,H,W] float, `input_ids` / `attention_mask` [B,T] long, `sample_id` [B] long
    (`caption_id` of the caption), `key` list[str], `caption` list[str], `skipped` {reason: count}.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_text_len: int = 32) -> None:
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` [B,T] long (T = the longest caption, at most max_text_len) and `sample_id`."""
        tokens = self.tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
            "sample_id": torch.tensor([caption_id(c) for c in captions], dtype=torch.long),
        }

    def __call__(self, samples: list[Sample], skipped: Mapping[str, int]) -> dict[str, Any]:
        captions = [s.caption for s in samples]
        # np.stack, not torch.stack: torch's parallel copy stalled for up to 0.5 s per batch on a busy 2-core
        # machine (main-process loaders use torch's intra-op threads); numpy's takes ~2 ms.
        images = torch.from_numpy(np.stack([s.image.numpy() for s in samples]))
        return {
            "image": images,
            **self.tokenize(captions),
            "key": [s.key for s in samples],
            "caption": captions,
            "skipped": dict(skipped),
        }


def batches(
    stream: Iterable[Sample | Skip], batch_size: int, collate: Collator, drop_last: bool, log: SkipLog
) -> Iterator[dict[str, Any]]:
    """Group a stream of samples and skips into batches of exactly `batch_size` good samples.

    Each batch carries the skips seen since the previous batch. A full batch is held until the next good
    sample arrives (or the stream ends), so skips at the end of a finite stream ride on its last batch;
    they are lost only where no batch follows them (a dropped last partial batch, or a worker that
    produced no batch at all), and are still logged there.
    """
    pending: list[Sample] = []
    skipped: Counter[str] = Counter()
    for item in stream:
        if isinstance(item, Skip):
            log(item)
            skipped[item.reason] += 1
            continue
        if len(pending) == batch_size:
            yield collate(pending, skipped)
            pending, skipped = [], Counter()
        pending.append(item)
    if pending and (len(pending) == batch_size or not drop_last):
        yield collate(pending, skipped)


def worker_slot() -> tuple[int, int]:
    """This reader's slot and the number of slots: (rank * workers + worker, world_size * workers)."""
    rank, world_size, worker, workers = wds.utils.pytorch_worker_info()
    return rank * workers + worker, world_size * workers


def split_by_node_and_worker(items: Iterable[Any]) -> Iterator[Any]:
    """This reader's share of `items`: every item goes to exactly one (node, DataLoader worker)."""
    return wds.split_by_worker(wds.split_by_node(items))


def make_loader(dataset: IterableDataset, num_workers: int, pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader over a dataset that yields whole batches (so `batch_size=None`)."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
