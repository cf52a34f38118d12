"""Per-item metadata of a retrieval index: one JSON object per item, looked up by item id.

Stored as ``items.jsonl`` (one UTF-8 JSON object per line, in item-id order) plus ``items.offsets.npy``
(int64 byte offsets, ``count + 1`` of them). A lookup is one ``os.pread`` of the item's line, O(1), and a
reader keeps only the memory-mapped offsets (8 bytes per item) and an open file descriptor, so millions
of items cost a few MB of RAM. Chosen over sqlite3 because it needs no locking or per-thread connections
(``pread`` is safe from many threads), writes at the speed of sequential appends, and stays readable with
``head``/``sed -n``.
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lavis_lite.errors import UserError

ITEMS_FILE = "items.jsonl"
OFFSETS_FILE = "items.offsets.npy"


class IndexLoadError(UserError):
    """A retrieval index (or an interrupted build) on disk is missing, incomplete or inconsistent."""


class MetadataWriter:
    """Appends items in id order to ``directory``; ``close()`` writes the offsets and returns the count."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._file = open(self.directory / ITEMS_FILE, "wb")
        self._offsets = array("q", [0])

    def append(self, items: Iterable[dict[str, Any]]) -> None:
        lines = [json.dumps(item, ensure_ascii=False).encode("utf-8") + b"\n" for item in items]
        for line in lines:
            self._offsets.append(self._offsets[-1] + len(line))
        self._file.write(b"".join(lines))

    def close(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        np.save(self.directory / OFFSETS_FILE, np.frombuffer(self._offsets, dtype=np.int64))
        return len(self._offsets) - 1


class MetadataStore:
    """Read side: ``store.get([3, 17])`` returns those items' dicts."""

    _fd = -1

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        offsets_path, items_path = self.directory / OFFSETS_FILE, self.directory / ITEMS_FILE
        try:
            self._offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IndexLoadError(f"{offsets_path} is not a readable offsets file ({err}): rebuild the index") from None
        size = items_path.stat().st_size
        offsets = self._offsets
        if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != size:
            raise IndexLoadError(
                f"{offsets_path} does not describe {items_path} ({size} bytes): rebuild the index"
            )
        if len(offsets) > 1 and np.any(np.diff(offsets) <= 0):
            raise IndexLoadError(f"{offsets_path} holds offsets out of order: rebuild the index")
        self._fd = os.open(items_path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, item_ids: Sequence[int]) -> list[dict[str, Any]]:
        items = []
        for item_id in item_ids:
            item_id = int(item_id)
            if not 0 <= item_id < len(self):
                raise IndexError(f"item id {item_id} out of range: the index holds {len(self)} items")
            start, end = int(self._offsets[item_id]), int(self._offsets[item_id + 1])
            try:
                item = json.loads(os.pread(self._fd, end - start, start))
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                raise IndexLoadError(
                    f"{self.directory / ITEMS_FILE}: item {item_id} is not a JSON line ({err}): rebuild the index"
                ) from None
            if not isinstance(item, dict):
                raise IndexLoadError(f"{self.directory / ITEMS_FILE}: item {item_id} is not a JSON object: rebuild the index")
            items.append(item)
        return items

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
