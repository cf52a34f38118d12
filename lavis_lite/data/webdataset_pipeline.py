"""Image-text webdataset shards (img2dataset layout) to batches: shuffling, node/worker splits, skips.

A shard holds samples `{key}.jpg|jpeg|png|webp`, `{key}.txt` and `{key}.json`; the caption is the `.txt`,
or the json's "caption" when there is no `.txt`.
"""

from __future__ import annotations

import json
import os
import random
import re
import tarfile
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from lavis_lite.data.config import DataConfig
from lavis_lite.data.samples import (
    CAPTION_NOT_UTF8,
    READ_ERROR,
    Collator,
    Sample,
    Skip,
    SkipLog,
    batches,
    make_loader,
    make_sample,
    split_by_node_and_worker,
    worker_slot,
)
from lavis_lite.data.transforms import PairTransform
from lavis_lite.errors import MissingFileError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Shards = Union[str, Path, Sequence[Union[str, Path]]]


def list_shards(shards: Shards) -> list[str]:
    """Shard paths/URLs from a directory (its `*.tar`, sorted), a brace pattern, or a list of either."""
    if isinstance(shards, (list, tuple)):
        return [url for item in shards for url in list_shards(item)]
    if Path(shards).is_dir():
        urls = sorted(str(p) for p in Path(shards).glob("*.tar"))
    else:
        urls = wds.shardlists.expand_urls(str(shards))
    if not urls:
        raise MissingFileError(f"no shards in {shards!r} (give a directory of .tar files or a brace pattern)")
    local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
    if local and len(local) == len(urls) and not any(os.path.isfile(url) for url in local):
        raise MissingFileError(
            f"no shards at {shards!r}: {local[0]} does not exist (give a directory of .tar files or a brace pattern; "
            "the demo's: make demo-assets)"
        )
    return urls


def read_images(shards: Shards, keys: Sequence[str]) -> dict[str, bytes]:
    """The encoded image bytes of the given sample keys, read straight from local shards (e.g. for galleries)."""
    wanted, found = set(keys), {}
    for url in list_shards(shards):
        with tarfile.open(url) as tar:
            for member in tar:
                # webdataset's split: the key ends at the first dot of the file name
                dot = member.name.find(".", member.name.rfind("/") + 1)
                key, ext = member.name[:dot], member.name[dot + 1 :]
                if dot > 0 and key in wanted and ext.lower() in IMAGE_EXTENSIONS and key not in found:
                    found[key] = tar.extractfile(member).read()
        if len(found) == len(wanted):
            break
    return found


class _ShardList(IterableDataset):
    """Each pass: every shard once, in a seeded order that is the same in every process (so the
    node/worker split of it is a partition) and new each epoch; `seed=None` keeps the given order."""

    def __init__(self, urls: list[str], seed: Optional[int]) -> None:
        self.urls = urls
        self.seed = seed
        self.epoch = -1

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch += 1
        urls = list(self.urls)
        if self.seed is not None:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(urls)
        for url in urls:
            yield {"url": url}


def _split(items: Iterable[Any], num_shards: int, level: str) -> Iterator[Any]:
    """Split shards across (node, worker) slots when there are enough of them, else split samples.

    With fewer shards than slots a shard-level split would idle some readers; instead every reader then
    reads all shards and keeps every n-th sample. Either way each sample reaches exactly one reader.
    """
    by_shard = num_shards >= worker_slot()[1]
    if by_shard == (level == "shard"):
        return split_by_node_and_worker(items)
    return iter(items)


class _Shuffle(wds.PipelineStage):
    """A sample shuffle buffer seeded by (seed, epoch, rank, worker): reproducible and different per reader."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize = bufsize
        self.seed = seed
        self.epoch = -1

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch, *wds.utils.pytorch_worker_info()))
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class _ReadErrors:
    """A webdataset exception handler: an unreadable shard or tar member becomes a `read_error` skip.

    webdataset reports a shard cut short twice, from the member it was reading and from the tar stream that
    then ends: the second report of the same file, with no sample in between, is not counted again."""

    def __init__(self) -> None:
        self.pending: list[Skip] = []
        self.last_file: Optional[str] = None

    def __call__(self, exn: Exception) -> bool:
        found = _FILE_NAME.search(str(exn))
        file = found.group(1) if found else None
        if file is None or file != self.last_file:
            self.pending.append(Skip(f"{type(exn).__name__}: {exn}", READ_ERROR))
        self.last_file = file
        return True  # continue with the next member or shard

    def drain(self) -> Iterator[Skip]:
        """The skips so far; called before each sample, so that a later error of the same file counts again."""
        while self.pending:
            yield self.pending.pop(0)
        self.last_file = None


_FILE_NAME = re.compile(r"name='([^']+)'")  # the file in webdataset's messages: "... <_io.BufferedReader name='x.tar'>"


def sample_caption(raw: dict[str, Any]) -> Optional[str]:
    """A sample's caption from its raw members ({ext: bytes}): the `.txt`, else the json's "caption".
    UnicodeDecodeError where the text is not UTF-8 (a caller skips the sample as `caption_not_utf8`)."""
    if "txt" in raw:
        return raw["txt"].decode("utf-8")
    if "json" not in raw:
        return None
    text = raw["json"].decode("utf-8")
    try:
        caption = json.loads(text).get("caption")
    except (ValueError, AttributeError):  # bad json, or json that is not an object
        return None
    return caption if isinstance(caption, str) else None


def _decode(src: Iterable[dict], transform: PairTransform, errors: _ReadErrors) -> Iterator[Sample | Skip]:
    for raw in src:
        yield from errors.drain()
        image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        try:
            caption = sample_caption(raw)
        except UnicodeDecodeError:
            yield Skip(raw["__key__"], CAPTION_NOT_UTF8)
            continue
        yield make_sample(raw["__key__"], image, caption, transform)
    yield from errors.drain()


def build_wds_pipeline(
    shards: Shards,
    transform: PairTransform,
    collate: Collator,
    cfg: DataConfig,
    *,
    train: bool,
) -> wds.DataPipeline:
    """An iterable of batches (see `Collator`) from shards; iterate it directly or through a DataLoader.

    train: shuffled shards and samples, full batches only; with `cfg.resampled` an endless stream of
    shards drawn with replacement (per-reader seeds), otherwise one pass per epoch split across readers.
    eval (`train=False`): one pass, unshuffled, every sample exactly once across nodes and workers, in
    a fixed order for a given number of readers; the last batch may be short.
    """
    urls = list_shards(shards)
    errors = _ReadErrors()
    finite = not (train and cfg.resampled)
    if finite:
        shard_order = _ShardList(urls, cfg.seed if train else None)
        stages: list[Any] = [shard_order, partial(_split, num_shards=len(urls), level="shard")]
    else:
        stages = [wds.ResampledShards(urls, seed=cfg.seed, deterministic=True)]
    stages.append(wds.tarfile_to_samples(handler=errors))
    if finite:
        stages.append(partial(_split, num_shards=len(urls), level="sample"))
    if train:
        stages.append(_Shuffle(cfg.shuffle_buffer, cfg.seed))
    stages.append(partial(_decode, transform=transform, errors=errors))
    stages.append(partial(batches, batch_size=cfg.batch_size, collate=collate, drop_last=train, log=SkipLog()))
    return wds.DataPipeline(*stages)


def create_wds_loader(
    shards: Shards,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_text_len: int = 32,
    train: bool = True,
) -> DataLoader:
    """A DataLoader of batches from image-text shards, each a dict:

    `image` [B,3,H,W] float, `input_ids` [B,T] long, `attention_mask` [B,T] long (T = the batch's longest
    caption, at most `max_text_len`), `sample_id` [B] long (a stable hash of the cleaned caption: equal
    captions, equal ids), `key` list[str], `caption` list[str], and `skipped` {reason: count} for the
    samples this worker skipped since its previous batch (sum them with `SkipCounter`).

    The split across nodes (RANK / WORLD_SIZE or torch.distributed) and DataLoader workers happens here,
    so do NOT pass this loader through `accelerate.Accelerator.prepare`: that would shard it a second
    time. With `train=True` and `cfg.resampled` the stream never ends (step-based training), which is
    what multi-GPU training wants: finite loaders (`resampled=False`, or `train=False` for evaluation)
    may give different ranks different numbers of batches, so gather their results by `key`.
    """
    pipeline = build_wds_pipeline(
        shards,
        PairTransform.from_config(cfg, image_size, mean, std, train=train),
        Collator(tokenizer, max_text_len),
        cfg,
        train=train,
    )
    return make_loader(pipeline, cfg.num_workers)
