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

ITEMS_FILE = "items.jsonl"
OFFSETS_FILE = "items.offsets.npy"


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
        self._offsets = np.load(self.directory / OFFSETS_FILE, mmap_mode="r")
        self._fd = os.open(self.directory / ITEMS_FILE, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, item_ids: Sequence[int]) -> list[dict[str, Any]]:
        items = []
        for item_id in item_ids:
            item_id = int(item_id)
            if not 0 <= item_id < len(self):
                raise IndexError(f"item id {item_id} out of range: the index holds {len(self)} items")
            start, end = int(self._offsets[item_id]), int(self._offsets[item_id + 1])
            items.append(json.loads(os.pread(self._fd, end - start, start)))
        return items

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
