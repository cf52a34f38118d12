"""Corpora to index: webdataset shards, an image folder or an annotation file, read as images with captions.

Every image becomes a `CorpusEntry`: a stable key, a locator that re-opens its image later in O(1) (a file
path, or a shard path with the tar member's data offset and size) and its cleaned captions. Entries are
listed without decoding any image (`Corpus.entries`); `decode` opens one, and `Corpus.items` yields decoded
`CorpusItem`s. Unusable images and captions are skipped and counted in a `SkipCounter`, never raised.

    shards       a directory of .tar shards, a brace pattern or one .tar (img2dataset layout: {key}.jpg + .txt/.json)
    folder       a directory of image files, recursive, sorted; an optional `{name}.txt` beside an image is its caption
    karpathy     a COCO / Flickr30K Karpathy-split .json: [{"image": path under image_root, "caption": [...]}]
    table        a .jsonl or .csv with `image_path` and `caption` columns (one row per caption)
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor

from lavis_lite.data.annotations import Record, read_karpathy, read_table
from lavis_lite.data.samples import (
    CAPTION_NOT_UTF8,
    CORRUPT_IMAGE,
    EMPTY_CAPTION,
    IMAGE_TOO_LARGE,
    MISSING_CAPTION,
    MISSING_IMAGE,
    READ_ERROR,
    UNSUPPORTED_FILE,
    Skip,
    SkipCounter,
    SkipLog,
)
from lavis_lite.data.config import MAX_IMAGE_PIXELS
from lavis_lite.data.transforms import clean_caption, decode_image
from lavis_lite.data.webdataset_pipeline import IMAGE_EXTENSIONS, list_shards, sample_caption
from lavis_lite.errors import UserError
from lavis_lite.inference.preprocess import ImageError, ImageTooLarge, open_image

CORPUS_KINDS = ("auto", "shards", "folder", "karpathy", "table")
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FOLDER_KNOWN = FOLDER_IMAGE_SUFFIXES + (".txt", ".json")  # sidecars are read or ignored; other files are counted
Locator = dict[str, Any]  # {"path": str} or {"shard": str, "offset": int, "size": int}
MAX_ITEM_BYTES = 256 << 20  # the most one item's encoded image may take in a shard
ImageProcessor = Callable[[Image.Image], Tensor]  # a model's eval transform: PIL image -> [3, S, S]


@dataclass
class CorpusEntry:
    """One image of a corpus, not decoded: `key` (unique, stable), `locator` (absolute paths), cleaned `captions`
    (may be empty)."""

    key: str
    locator: Locator
    captions: list[str] = field(default_factory=list)


@dataclass
class CorpusItem(CorpusEntry):
    """A corpus entry with its decoded RGB image."""

    image: Optional[Image.Image] = None


def describe_locator(locator: Locator) -> str:
    """A locator as a short human-readable string, e.g. `shard-000000.tar@1536`."""
    return locator["path"] if "path" in locator else f"{locator['shard']}@{locator['offset']}"


def read_item_bytes(locator: Locator) -> bytes:
    """The encoded image bytes an entry points to (one seek and read for a shard member)."""
    if "path" in locator:
        return Path(locator["path"]).read_bytes()
    with open(locator["shard"], "rb") as f:
        f.seek(locator["offset"])
        data = f.read(locator["size"])
    if len(data) != locator["size"]:
        raise OSError(f"{locator['shard']} is shorter than the index recorded (was it rewritten?)")
    return data


def corpus_roots(described: dict[str, Any]) -> list[str]:
    """The folders an index's items may be read from (its manifest's `corpus`): the corpus folder, or the folder
    of its shards or annotation file, and the image root."""
    roots = [described["path"] if os.path.isdir(described["path"]) else os.path.dirname(described["path"])]
    roots += [described["image_root"]] if described.get("image_root") else []
    return [os.path.normpath(os.path.abspath(root)) for root in roots]


def _check_locator(locator: Locator, roots: Sequence[str]) -> None:
    """ImageError unless `locator` names a file under one of `roots` (metadata is data, not paths to trust) and,
    for a shard member, a plausible offset and size."""
    target = locator.get("path", locator.get("shard")) if isinstance(locator, dict) else None
    if not isinstance(target, str):
        raise ImageError(f"index metadata holds a malformed locator {str(locator)[:200]}: rebuild the index")
    resolved = os.path.normpath(os.path.abspath(target))
    if not any(resolved == root or resolved.startswith(root + os.sep) for root in roots):
        raise ImageError(f"index metadata names {target}, outside its corpus ({', '.join(roots)}): not opened")
    if "shard" in locator:
        offset, size = locator.get("offset"), locator.get("size")
        if not (isinstance(offset, int) and isinstance(size, int) and offset >= 0 and 0 < size <= MAX_ITEM_BYTES):
            raise ImageError(f"index metadata gives {target} an implausible offset {offset} / size {size}: rebuild the index")


def open_item_image(
    locator: Locator, roots: Optional[Sequence[str]] = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """An entry's image, decoded in RGB; `ImageError` naming where it was when it is missing, unreadable or over
    `max_pixels`. With `roots` (`corpus_roots` of an index) the locator must point inside them."""
    if roots is not None:
        _check_locator(locator, roots)
    if "path" in locator:
        return open_image(locator["path"], max_pixels)
    name = describe_locator(locator)
    try:
        data = read_item_bytes(locator)
    except FileNotFoundError:
        raise ImageError(f"image not found: shard {locator['shard']} is missing (was the corpus moved?)") from None
    except OSError as err:
        raise ImageError(f"cannot read image {name}: {err}") from None
    return decode_image(data, name, max_pixels)


def detect_kind(path: str) -> str:
    """The corpus kind of a path (see the module docstring); ValueError naming what was expected."""
    p = Path(path)
    if p.is_dir():
        return "shards" if any(p.glob("*.tar")) else "folder"
    if p.is_file():
        kinds = {".tar": "shards", ".json": "karpathy", ".jsonl": "table", ".csv": "table"}
        if p.suffix.lower() in kinds:
            return kinds[p.suffix.lower()]
    elif "{" in path:
        return "shards"
    raise UserError(
        f"corpus not found or not understood: {path} (give a directory of .tar shards, an image folder, "
        "or a .json / .jsonl / .csv annotation file)"
    )


class Corpus:
    """A corpus to index or evaluate on. `require_captions`: leave out (and count) images with no usable
    caption (text indexes, evaluation); otherwise such images are kept with `captions == []`."""

    def __init__(
        self,
        path: str,
        kind: str = "auto",
        image_root: Optional[str] = None,
        max_words: int = 50,
        require_captions: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if kind not in CORPUS_KINDS:
            raise UserError(f"unknown corpus kind {kind!r}: choose from {list(CORPUS_KINDS)}")
        self.path = str(path)
        self.kind = detect_kind(self.path) if kind == "auto" else kind
        self.image_root = image_root
        self.max_words = max_words
        self.require_captions = require_captions
        self.max_pixels = max_pixels  # larger images are skipped as image_too_large
        self._log = SkipLog()

    def describe(self) -> dict[str, Any]:
        """What the corpus is, for an index manifest: an interrupted build resumes only onto the same
        `fingerprint` (the name, size and modification time of every file it reads entries from)."""
        root = os.path.abspath(self.image_root) if self.image_root else None
        return {"kind": self.kind, "path": os.path.abspath(self.path), "image_root": root, "fingerprint": self._fingerprint()}

    def _fingerprint(self) -> str:
        if self.kind == "shards":
            files = [Path(shard) for shard in list_shards(self.path)]
        elif self.kind == "folder":
            files = sorted(p for p in Path(self.path).rglob("*") if p.is_file())
        else:
            files = [Path(self.path)]
        digest = hashlib.blake2b(digest_size=12)
        for path in files:
            stat = path.stat() if path.is_file() else None
            digest.update(f"{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def _skip(self, skipped: SkipCounter, key: str, reason: str) -> None:
        skipped.add(reason)
        self._log(Skip(key, reason))

    def _clean(self, key: str, raw_captions: list[Optional[str]], skipped: SkipCounter) -> Optional[list[str]]:
        """The usable captions; None when the entry is to be left out (counted)."""
        captions = []
        for caption in raw_captions:
            if caption is None:
                continue
            cleaned = clean_caption(caption, self.max_words)
            if cleaned:
                captions.append(cleaned)
            else:
                self._skip(skipped, key, EMPTY_CAPTION)
        if self.require_captions and not captions:
            if not any(c is not None for c in raw_captions):
                self._skip(skipped, key, MISSING_CAPTION)
            return None
        return captions

    def entries(self, skipped: SkipCounter) -> Iterator[CorpusEntry]:
        """Every usable entry, in a fixed order, without decoding images; skips go to `skipped`."""
        readers = {"shards": self._shard_entries, "folder": self._folder_entries}
        raw = readers.get(self.kind, self._annotation_entries)(skipped)
        for key, locator, raw_captions in raw:
            captions = self._clean(key, raw_captions, skipped)
            if captions is not None:
                yield CorpusEntry(key, locator, captions)

    def decode(self, entry: CorpusEntry, skipped: SkipCounter) -> Optional[CorpusItem]:
        """The entry with its image decoded, or None (counted as missing_image / corrupt_image)."""
        image = _open(entry, self.max_pixels)
        if isinstance(image, str):
            self._skip(skipped, entry.key, image)
            return None
        return CorpusItem(entry.key, entry.locator, entry.captions, image)

    def pixel_batches(
        self,
        entries: Iterable[CorpusEntry],
        processor: ImageProcessor,
        batch_size: int,
        skipped: SkipCounter,
        num_workers: int = 4,
    ) -> Iterator[tuple[list[CorpusEntry], Tensor]]:
        """Batches of the entries' images through `processor`: (the usable entries, pixels [B,3,S,S]).

        `num_workers` threads decode and resize, one batch ahead of the consumer; undecodable images are
        skipped and counted."""

        def load(entry: CorpusEntry) -> Tensor | str:
            image = _open(entry, self.max_pixels)
            return image if isinstance(image, str) else processor(image)

        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            pending: Optional[tuple[list[CorpusEntry], list[Future]]] = None
            for batch in batched(entries, batch_size):
                submitted = batch, [pool.submit(load, entry) for entry in batch]
                if pending is not None:
                    yield from self._collect(*pending, skipped)
                pending = submitted
            if pending is not None:
                yield from self._collect(*pending, skipped)

    def _collect(
        self, batch: list[CorpusEntry], futures: list[Future], skipped: SkipCounter
    ) -> Iterator[tuple[list[CorpusEntry], Tensor]]:
        kept, pixels = [], []
        for entry, future in zip(batch, futures):
            result = future.result()
            if isinstance(result, str):
                self._skip(skipped, entry.key, result)
            else:
                kept.append(entry)
                pixels.append(result)
        if kept:
            yield kept, torch.stack(pixels)

    def decodable(self, entries: Iterable[CorpusEntry], skipped: SkipCounter, num_workers: int = 4) -> Iterator[CorpusEntry]:
        """The entries whose image decodes (`num_workers` threads), in order; the others skipped and counted.
        A text index checks its images this way: its hits show them."""
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            for batch in batched(entries, 64):
                for entry, image in zip(batch, pool.map(lambda e: _open(e, self.max_pixels), batch)):
                    if isinstance(image, str):
                        self._skip(skipped, entry.key, image)
                    else:
                        yield entry

    def items(self, skipped: SkipCounter) -> Iterator[CorpusItem]:
        """Every usable entry with its decoded image."""
        for entry in self.entries(skipped):
            item = self.decode(entry, skipped)
            if item is not None:
                yield item

    # ---- readers: (key, locator, raw captions) --------------------------------------------------
    def _shard_entries(self, skipped: SkipCounter) -> Iterator[tuple[str, Locator, list[Optional[str]]]]:
        for shard in list_shards(self.path):
            if not os.path.isfile(shard):
                raise UserError(f"shard {shard} is not a local file: indexes re-open images from local shards")
            shard = os.path.abspath(shard)
            try:
                for key, image, texts in _shard_samples(shard):
                    if image is None:
                        self._skip(skipped, key, MISSING_IMAGE)
                        continue
                    try:
                        captions = [sample_caption(texts)]
                    except UnicodeDecodeError:
                        self._skip(skipped, key, CAPTION_NOT_UTF8)
                        continue
                    yield key, {"shard": shard, "offset": image.offset_data, "size": image.size}, captions
            except (tarfile.TarError, OSError) as err:  # the rest of this shard is unreadable; go on with the next
                self._skip(skipped, f"{shard}: {type(err).__name__}: {err}", READ_ERROR)

    def _folder_entries(self, skipped: SkipCounter) -> Iterator[tuple[str, Locator, list[Optional[str]]]]:
        root = Path(self.path)
        files = sorted(
            (p for p in root.rglob("*") if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in _FOLDER_KNOWN):
            self._skip(skipped, path.relative_to(root).as_posix(), UNSUPPORTED_FILE)
        for path in files:
            sidecar = path.with_suffix(".txt")
            captions = [sidecar.read_text(encoding="utf-8", errors="replace")] if sidecar.is_file() else []
            yield path.relative_to(root).as_posix(), {"path": os.path.abspath(path)}, captions

    def _annotation_entries(self, skipped: SkipCounter) -> Iterator[tuple[str, Locator, list[Optional[str]]]]:
        path = Path(self.path)
        root = Path(self.image_root) if self.image_root else path.parent
        records: list[Record] = read_karpathy(path, root) if self.kind == "karpathy" else read_table(path, root)
        by_image: dict[str, list[Optional[str]]] = {}
        for record in records:  # one entry per image, its captions in file order
            by_image.setdefault(record.image_path, []).append(record.caption)
        for image_path, captions in by_image.items():
            image = Path(image_path)
            key = image.relative_to(root).as_posix() if image.is_relative_to(root) else image.as_posix()
            yield key, {"path": os.path.abspath(image_path)}, captions


def _open(entry: CorpusEntry, max_pixels: int) -> Image.Image | str:
    """The entry's decoded image, or why it cannot be had (missing_image / image_too_large / corrupt_image)."""
    if "path" in entry.locator and not os.path.isfile(entry.locator["path"]):
        return MISSING_IMAGE
    try:
        return open_item_image(entry.locator, max_pixels=max_pixels)
    except ImageTooLarge:
        return IMAGE_TOO_LARGE
    except ImageError:
        return CORRUPT_IMAGE


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of `size` consecutive items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _shard_samples(shard: str) -> Iterator[tuple[str, Optional[tarfile.TarInfo], dict[str, bytes]]]:
    """A shard's samples in tar order: (key, its image member or None, its `txt` / `json` contents).

    Consecutive members sharing a key (the name up to the first dot of the file name, as webdataset splits
    it) form one sample."""
    with tarfile.open(shard) as tar:
        key, image, texts = None, None, {}
        for member in tar:
            dot = member.name.find(".", member.name.rfind("/") + 1)
            if not member.isfile() or dot <= 0:
                continue
            member_key, ext = member.name[:dot], member.name[dot + 1 :].lower()
            if member_key != key:
                if key is not None:
                    yield key, image, texts
                key, image, texts = member_key, None, {}
            if ext in IMAGE_EXTENSIONS and image is None:
                image = member
            elif ext in ("txt", "json"):
                texts[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, image, texts
