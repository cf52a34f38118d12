"""Cache of the frozen image encoder's output, for training without image augmentation.

The encoder is frozen, so with the eval transform its tokens never change: computing them once turns
every later epoch into Q-Former work only. Stored as float16 chunks (memory-bounded to write, memory-
mapped to read) with the captions, under a fingerprint of the encoder, the input size and the shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lavis_lite.config import VisionConfig, to_dict
from lavis_lite.config import ConfigError
from lavis_lite.io import atomic_write_text, recover_dir, replace_dir, staging_dir
from lavis_lite.models.vision import FrozenVisionEncoder

MANIFEST = "manifest.json"


def cache_fingerprint(cfg: VisionConfig, image_size: int, shards: list[str]) -> str:
    """Identifies what the tokens came from: the encoder (config, weight file size/mtime), the input size
    and the shards (paths, sizes, mtimes). Any change gives a new cache."""

    def stat(path: str) -> list:
        return [path, Path(path).stat().st_size, int(Path(path).stat().st_mtime)] if Path(path).is_file() else [path]

    ident: dict[str, Any] = {"vision": to_dict(cfg), "image_size": image_size, "shards": [stat(s) for s in shards]}
    if cfg.checkpoint:
        ident["checkpoint_file"] = stat(cfg.checkpoint)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def trace_encoder(encoder: FrozenVisionEncoder, example: Tensor) -> torch.jit.ScriptModule:
    """`torch.jit.trace` + `freeze` of a frozen encoder (measured 2.6x faster than eager for a CNN on CPU)."""
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(encoder.eval(), example, check_trace=False))


def encode_in_micro_batches(encoder: Callable[[Tensor], Tensor], images: Tensor, micro_batch: Optional[int]) -> Tensor:
    """`encoder` over `images` in calls of `micro_batch` images (None: one call)."""
    return torch.cat([encoder(part) for part in images.split(micro_batch or len(images))])


class FeatureCache:
    """Cached tokens [N, L, C] (float16, memory-mapped) with their keys and captions."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = json.loads((self.root / MANIFEST).read_text())
        self.fingerprint: str = manifest["fingerprint"]
        self.skipped: dict[str, int] = manifest["skipped"]
        self.keys: list[str] = manifest["keys"]
        self.captions: list[str] = manifest["captions"]
        self.chunks = [np.load(self.root / name, mmap_mode="r") for name in manifest["chunks"]]
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def tokens(self, indices: Tensor | np.ndarray | list[int]) -> Tensor:
        """float32 tokens of the given samples, in that order."""
        indices = np.asarray(indices)
        chunk = np.searchsorted(self.offsets, indices, side="right") - 1
        rows = [self.chunks[c][i - self.offsets[c]] for c, i in zip(chunk, indices)]
        return torch.from_numpy(np.stack(rows)).float()

    @staticmethod
    def is_complete(root: Path, fingerprint: str) -> bool:
        recover_dir(root)
        manifest = Path(root) / MANIFEST
        return manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint


def build_feature_cache(
    encoder: torch.nn.Module,
    batches: Iterable[dict],
    root: Path,
    fingerprint: str,
    skipped: Optional[Any] = None,
    chunk_size: int = 4096,
    total: Optional[int] = None,
    micro_batch: Optional[int] = None,
) -> FeatureCache:
    """Run `encoder` over eval batches (fields image, key, caption) and store the tokens; `micro_batch` images
    per encoder call (None: each batch whole).

    Reuses a complete cache with the same fingerprint. Written into a temp directory and renamed, so
    an interrupted build leaves no half cache behind. `skipped` is the data's SkipCounter (recorded).
    """
    root = Path(root)
    if FeatureCache.is_complete(root, fingerprint):
        return FeatureCache(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root)
    keys, captions, chunks, pending = [], [], [], []

    def flush() -> None:
        if pending:
            name = f"tokens-{len(chunks):05d}.npy"
            np.save(tmp / name, np.concatenate(pending).astype(np.float16))
            chunks.append(name)
            pending.clear()

    with torch.no_grad(), tqdm(total=total, desc=f"caching features -> {root.name}", unit="img") as progress:
        for batch in batches:
            if skipped is not None:
                skipped.update(batch)
            pending.append(encode_in_micro_batches(encoder, batch["image"], micro_batch).float().cpu().numpy())
            keys += list(batch["key"])
            captions += list(batch["caption"])
            progress.update(len(batch["key"]))
            if sum(len(p) for p in pending) >= chunk_size:
                flush()
    flush()
    manifest = {
        "fingerprint": fingerprint,
        "count": len(keys),
        "chunks": chunks,
        "keys": keys,
        "captions": captions,
        "skipped": skipped.as_dict() if skipped is not None else {},
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest))
    replace_dir(tmp, root)
    return FeatureCache(root)


def cached_batches(
    cache: FeatureCache,
    tokenize: Callable[[list[str]], dict],
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict]:
    """Endless batches from the cache: a fresh permutation each epoch, the same for a given seed.

    Batch n of the stream depends only on (seed, n): a run resumed at batch n continues exactly.
    Each rank takes its own slice of every global batch.
    """
    per_epoch = len(cache) // (batch_size * world_size)
    if per_epoch == 0:
        raise ConfigError(f"the cache holds {len(cache)} samples, fewer than one global batch of {batch_size * world_size}")
    n = start_batch
    while True:
        epoch, within = divmod(n, per_epoch)
        order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        start = (within * world_size + rank) * batch_size
        idx = order[start : start + batch_size]
        texts = tokenize([cache.captions[i] for i in idx.tolist()])
        yield {"vision_tokens": cache.tokens(idx), **texts}
        n += 1
