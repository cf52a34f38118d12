"""Image-text pairs from annotation files: COCO / Flickr30K Karpathy-split JSON (LAVIS/BLIP format), or a
JSONL / CSV table with `image_path` and `caption` columns; plus retrieval evaluation sets."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

from lavis_lite.data.config import DataConfig
from lavis_lite.data.samples import (
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    Collator,
    Sample,
    Skip,
    SkipCounter,
    SkipLog,
    batches,
    make_loader,
    make_sample,
    split_by_node_and_worker,
)
from lavis_lite.data.transforms import PairTransform, clean_caption
from lavis_lite.errors import MissingFileError, UserError

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Record:
    """One annotated pair: the image file (absolute, or relative to the working directory) and its caption."""

    key: str
    image_path: str
    caption: Optional[str]


def _captions(ann: dict) -> list[Optional[str]]:
    caption = ann.get("caption")
    return list(caption) if isinstance(caption, list) else [caption]


def _karpathy_entries(ann_path: PathLike) -> list[dict]:
    """A Karpathy JSON's entries, checked: a list of objects with an `image` path and a `caption` (a string or a
    list); UserError naming the file and the first entry that is not."""
    path = Path(ann_path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"annotation file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a JSON file ({err}): give a Karpathy-split JSON") from None
    if not isinstance(entries, list):
        raise UserError(f"{path} holds a JSON {type(entries).__name__}, not the list of a Karpathy-split JSON")
    for i, ann in enumerate(entries):
        if not (isinstance(ann, dict) and isinstance(ann.get("image"), str) and isinstance(ann.get("caption"), (str, list))):
            raise UserError(
                f"{path}: entry {i} is not {{\"image\": path, \"caption\": text or [texts]}}: {json.dumps(ann)[:120]}"
            )
    return entries


def read_karpathy(ann_path: PathLike, image_root: PathLike) -> list[Record]:
    """Training pairs from a Karpathy-split JSON: `[{"image": relative path, "caption": str or [str, ...]}]`.

    A list of captions gives one record per caption; the key is `"{image}#{caption index}"`.
    """
    records = []
    for ann in _karpathy_entries(ann_path):
        path = str(Path(image_root) / ann["image"])
        for i, caption in enumerate(_captions(ann)):
            records.append(Record(f"{ann['image']}#{i}", path, caption))
    return records


def read_table(path: PathLike, image_root: Optional[PathLike] = None) -> list[Record]:
    """Pairs from a `.jsonl` (one object per line) or `.csv` (with a header) with `image_path` and `caption`
    columns; an optional `key` column names the samples (else the row number). Relative image paths are
    resolved against `image_root` (default: the table's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            raise UserError(f"{path}: expected a .jsonl or .csv file")
    records = []
    for i, row in enumerate(rows):
        if "image_path" not in row:
            raise UserError(f"{path}: row {i} has no 'image_path' column")
        records.append(Record(str(row.get("key") or i), str(root / row["image_path"]), row.get("caption")))
    return records


class AnnotationDataset(Dataset):
    """A map-style dataset: item i is a `Sample` (transformed image, cleaned caption, key) or, for an
    unusable record (missing / corrupt image, missing / empty caption), a `Skip` saying why."""

    def __init__(self, records: Sequence[Record], transform: PairTransform) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | Skip:
        record = self.records[index]
        return make_sample(record.key, record.image_path, record.caption, self.transform)


class _IndexStream(IterableDataset):
    """Items of a map-style dataset, split across nodes and workers; each epoch one pass in an order that
    is seeded (the same in every process, new each epoch) or, with `seed=None`, the dataset's order."""

    def __init__(self, dataset: AnnotationDataset, seed: Optional[int], endless: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.endless = endless
        self.epoch = -1

    def __iter__(self) -> Iterator[Sample | Skip]:
        while True:
            self.epoch += 1
            order = list(range(len(self.dataset)))
            if self.seed is not None:
                random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
            good = 0
            for index in split_by_node_and_worker(order):
                item = self.dataset[index]
                good += isinstance(item, Sample)
                yield item
            if not self.endless:
                return
            if not good:
                raise RuntimeError("an epoch of the annotation dataset had no usable sample for this reader")


def create_annotation_loader(
    dataset: AnnotationDataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    *,
    max_text_len: int = 32,
    train: bool = True,
) -> DataLoader:
    """A DataLoader of batches (the same dict as `create_wds_loader`'s) from an AnnotationDataset.

    train: a shuffled order each epoch, full batches only, endless when `cfg.resampled`. eval: one pass
    in dataset order, every usable item exactly once across nodes and workers. Like the webdataset
    loader it splits by node and worker itself: do not pass it through `accelerate`'s `prepare`.
    """
    stream = _IndexStream(dataset, cfg.seed if train else None, endless=train and cfg.resampled)
    collate = Collator(tokenizer, max_text_len)
    batcher = partial(batches, batch_size=cfg.batch_size, collate=collate, drop_last=train, log=SkipLog())
    return make_loader(wds.DataPipeline(stream, batcher), cfg.num_workers)


@dataclass
class RetrievalSet:
    """An image-text retrieval evaluation set, indexed as LAVIS's retrieval datasets are.

    `images[i]` is image i's path relative to the image root, which is also its `key` in batches of
    `dataset` (one record per image, captioned with its first caption); `texts[j]` is caption j,
    cleaned; `txt2img[j]` is caption j's image; `img2txt[i]` lists image i's captions. Images whose
    file is missing and captions that are missing or clean to "" are left out and counted in `skipped`
    (so are images left with no caption); an image that fails to decode later is missing from
    `dataset`'s batches (and counted in their `skipped`): match image features to `images` by key.
    """

    images: list[str]
    texts: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]
    dataset: AnnotationDataset
    skipped: SkipCounter


def read_karpathy_eval(ann_path: PathLike, image_root: PathLike, transform: PairTransform) -> RetrievalSet:
    """A retrieval set from a Karpathy val/test JSON: `[{"image": relative path, "caption": [5 captions]}]`."""
    images: list[str] = []
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    records: list[Record] = []
    skipped, log = SkipCounter(), SkipLog()

    def skip(key: str, reason: str) -> None:
        skipped.add(reason)
        log(Skip(key, reason))

    for ann in _karpathy_entries(ann_path):
        path = Path(image_root) / ann["image"]
        if not path.is_file():
            skip(ann["image"], MISSING_IMAGE)
            continue
        raw, captions = _captions(ann), []
        for i, caption in enumerate(raw):
            cleaned = clean_caption(caption, transform.max_words) if isinstance(caption, str) else ""
            if cleaned:
                captions.append(cleaned)
            else:
                skip(f"{ann['image']}#{i}", EMPTY_CAPTION if isinstance(caption, str) else MISSING_CAPTION)
        if not captions:  # its captions were counted above, unless it had none at all
            if not raw:
                skip(ann["image"], MISSING_CAPTION)
            continue
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        txt2img.extend([len(images)] * len(captions))
        texts.extend(captions)
        records.append(Record(ann["image"], str(path), captions[0]))
        images.append(ann["image"])
    return RetrievalSet(images, texts, txt2img, img2txt, AnnotationDataset(records, transform), skipped)
