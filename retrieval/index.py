"""FAISS index of multi-vector items (BLIP-2 ITC features), built in resumable chunks and searched by item.

An item (an image, or a text) has ``vectors_per_item`` L2-normalised vectors of ``dim`` floats: BLIP-2
gives an image Q=32 query vectors of 256 and a text 1. The ITC score of a query against an item is the
max over the item's vectors (and, for a multi-vector image query, over the query's vectors) of the dot
product; search returns the top-k *items* by that score.

Index types (``INDEX_TYPES``; ``"auto"`` picks one and its options with :func:`choose_index`):

- ``flat``: every vector in an ``IndexFlatIP``; exact (ranks as brute force does).
- ``ivf``: ``IndexIVFFlat`` over every vector, ``nlist`` ~ 4 sqrt(vectors) lists, ``nprobe`` searched.
- ``ivfpq``: IVF with product-quantised vectors (``pq_bytes`` per vector, 32 by default): 32x less RAM
  than float32 at 256-d, approximate scores.
- ``pqfs``: 4-bit fast-scan PQ (``pq_bytes`` per vector, dim / 4 by default), scanned in full with SIMD
  look-up tables: an approximate exhaustive scan, 16x less RAM than float32.
- ``hnsw``: ``IndexHNSWFlat`` graph (``hnsw_m`` links, ``ef_search`` beam).

Approximate search of multi-vector items over-fetches ``k * vectors_per_item`` vectors (at most
``max_fetch``) and groups them by item, so an item whose best vectors the index misses is ranked by the
best vector it found, or not at all.

With ``index_options={"first_stage": "mean", "rescore": R}`` faiss holds one vector per item instead (the
mean of its vectors, renormalised); search takes its ``R`` best candidate items and re-scores them exactly
from the items' full vectors, stored as float16 in ``vectors.f16.npy`` (memory-mapped). ``rescore``
alone re-scores an all-vectors index's candidates the same way (useful after PQ's lossy scores).

Large collections of multi-vector items (``auto`` beyond ``IVF_MAX_VECTORS`` vectors) keep the
re-scoring vectors in RAM instead: with ``rescore_codes`` ``sq8`` / ``sq6`` / ``sq4`` each item's vectors
are scalar-quantised (8, 6 or 4 bits per dimension) into an inverted list of their own, and the first-stage
index over the item means is that ``IndexIVFScalarQuantizer``'s coarse quantizer: one faiss call takes the
``rescore`` best items by mean (the lists to probe) and scans their vectors' codes in C++, in parallel over
the lists. This is multi-vector late interaction as ColBERTv2 / PLAID serve it (centroid-based candidate
generation, then re-scoring from compressed vectors), with one centroid per item. ``exact_rescore`` N then
re-ranks the best N items exactly from ``vectors.f16.npy`` (on disk, a few pages per query). Every option and
its default: ``INDEX_OPTIONS``.

Layout of an index directory: ``manifest.json`` (written last), ``index.faiss`` (CPU format),
``items.jsonl`` + ``items.offsets.npy`` (see :mod:`retrieval.metadata`) and, with rescoring,
``vectors.f16.npy``; with ``rescore_codes`` ``sq*``, ``index.faiss`` is the per-item IVF-SQ (its quantizer the
first stage). Building happens in ``<out_dir>.partial/``: chunk files first (each written to a
temporary name and renamed, so a killed build keeps only whole chunks), then ``build/``, which is swapped
with ``out_dir`` in one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it (otherwise two renames, so
``out_dir`` is briefly absent, never half written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from lavis_lite.errors import UserError
from lavis_lite.io import atomic_write, recover_dir, remove_dir, remove_staging, replace_dir

from .metadata import ITEMS_FILE, OFFSETS_FILE, IndexLoadError, MetadataStore, MetadataWriter

logger = logging.getLogger("lavis_lite.retrieval")

INDEX_TYPES = ("flat", "ivf", "ivfpq", "pqfs", "hnsw")
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.f16.npy"
SETTINGS_FILE = "settings.json"

# choose_index thresholds, in vectors (items x vectors_per_item), sized for 256-d float32 vectors.
# Up to 1M vectors (~31k images of 32 vectors, 1 GB) a flat scan is exact and fast enough; up to 8M
# (250k images, 8 GB) IVF-Flat keeps exact vectors in RAM. Beyond, multi-vector items get a fast-scan mean
# first stage over per-item 6-bit lists (AUTO_ITEM_LISTS: at 1M images recall@10 0.98 at 15 ms, 6.4 GB,
# docs/benchmarks.md) and single vectors IVF-PQ at 32 bytes per vector.
FLAT_MAX_VECTORS = 1_000_000
IVF_MAX_VECTORS = 8_000_000
AUTO_ITEM_LISTS = {"first_stage": "mean", "rescore_codes": "sq6", "rescore": 8192, "exact_rescore": 32}
SQ_CODES = {"sq8": "QT_8bit", "sq6": "QT_6bit", "sq4": "QT_4bit"}
SQ_TRAIN_SIZE = 262_144  # vectors sampled to fit the scalar quantizer's per-dimension ranges

DEFAULT_MAX_FETCH = 4096  # vectors fetched per query vector by approximate search before grouping by item
DEFAULT_MEAN_RESCORE = 256  # candidate items re-scored exactly after a "mean" first stage
FLAT_BLOCK_SCORES = 1 << 24  # scores per product in the exact CPU scan: its scratch memory (64 MB)
GPU_MAX_K = 2048  # faiss GPU k-selection limit; larger fetches run on the CPU copy of the index
# float16 -> float32 by table look-up: 2x faster than numpy's astype, which re-scoring spends its time in
FLOAT16_TO_32 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)

MANIFEST_FIELDS = {
    "format_version": int,
    "index_type": str,
    "index_options": dict,
    "dim": int,
    "vectors_per_item": int,
    "count": int,
    "num_vectors": int,
    "indexed_vectors": int,
    "faiss_version": str,
    "created": str,
    "build_id": str,
}
INDEX_OPTIONS = {  # index_options keys; resolve_index_options fills in the defaults (stored in the manifest)
    "first_stage": "'all' (index every vector) or 'mean' (one renormalised mean per item; needs rescore)",
    "rescore": f"candidate items re-scored exactly from float16 vectors (0 = off; {DEFAULT_MEAN_RESCORE} for 'mean')",
    "rescore_codes": "what re-scoring reads: 'f16' (vectors.f16.npy, exact) or 'sq8' / 'sq6' / 'sq4' (per-item "
    "lists of scalar-quantised vectors in RAM; first_stage 'mean' only)",
    "exact_rescore": "with sq rescore_codes: the best items re-ranked exactly from vectors.f16.npy (0 = off, "
    "no float16 copy written); ignored otherwise",
    "max_fetch": f"approximate search: vectors fetched per query vector before grouping ({DEFAULT_MAX_FETCH})",
    "seed": "training-sample seed (0)",
    "train_size": "IVF/PQ training sample (40 x nlist, at least 10k (IVF) / 65,536 (PQ), at most 1M)",
    "nlist": "IVF lists (4 sqrt(vectors), <= vectors / 39, <= 65,536)",
    "nprobe": "IVF lists searched, a search default (max(8, nlist / 32))",
    "pq_bytes": "PQ bytes per vector: ivfpq sub-quantizers at 8 bits, must divide dim (32); pqfs 2 4-bit "
    "codes each, 2 x pq_bytes must divide dim (dim / 4)",
    "pq_bits": "bits per PQ sub-quantizer code (8)",
    "hnsw_m": "HNSW links per node (32)",
    "ef_construction": "HNSW build beam (80)",
    "ef_search": "HNSW search beam, a search default (128; at least the vectors fetched)",
}


class ItemVectors:
    """``vectors.f16.npy`` read item by item with ``pread``: a query's candidates cost one disk read each
    when the file is not in the page cache (a memory map faults page by page with read-ahead, about 30x
    slower cold), and the process's resident memory does not grow with the pages read."""

    def __init__(self, path: Path):
        mapped = np.load(path, mmap_mode="r")
        self.shape, self.offset = mapped.shape, mapped.offset
        self.item_bytes = int(np.prod(self.shape[1:])) * 2
        self._file = open(path, "rb")  # noqa: SIM115 (held for the index's lifetime)

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        """Items ``ids`` as float32 [len(ids), vectors_per_item, dim]."""
        fd, size, offset = self._file.fileno(), self.item_bytes, self.offset
        raw = b"".join(os.pread(fd, size, offset + int(i) * size) for i in ids)
        return np.take(FLOAT16_TO_32, np.frombuffer(raw, np.uint16)).reshape(len(ids), *self.shape[1:])


@dataclass(frozen=True)
class Hit:
    item_id: int
    score: float


def choose_index(num_items: int, vectors_per_item: int) -> tuple[str, dict]:
    """What ``index_type="auto"`` builds, by corpus size (``benchmarks/retrieval_index.py`` measured the
    choices): ``flat`` up to ``FLAT_MAX_VECTORS`` vectors, ``ivf`` up to ``IVF_MAX_VECTORS``; beyond, a
    ``pqfs`` mean first stage over per-item 6-bit lists for multi-vector items, ``ivfpq`` for single vectors.
    The caller's ``index_options`` override the options returned here."""
    num_vectors = num_items * vectors_per_item
    if num_vectors <= FLAT_MAX_VECTORS:
        return "flat", {}
    if num_vectors <= IVF_MAX_VECTORS:
        return "ivf", {}
    return ("pqfs", dict(AUTO_ITEM_LISTS)) if vectors_per_item > 1 else ("ivfpq", {})


def resolve_index_options(index_type: str, num_indexed: int, dim: int, options: Optional[dict] = None) -> dict:
    """The caller's ``index_options`` with every default filled in for ``num_indexed`` faiss vectors."""
    options = dict(options or {})
    unknown = set(options) - set(INDEX_OPTIONS)
    if unknown:
        raise UserError(f"unknown index_options {sorted(unknown)}; known: {sorted(INDEX_OPTIONS)}")
    first_stage = options.setdefault("first_stage", "all")
    if first_stage not in ("all", "mean"):
        raise UserError(f"index_options first_stage must be 'all' or 'mean', not {first_stage!r}")
    rescore = options.setdefault("rescore", DEFAULT_MEAN_RESCORE if first_stage == "mean" else 0)
    if first_stage == "mean" and rescore <= 0:
        raise UserError("first_stage 'mean' ranks by a proxy score: it needs rescore > 0 candidates")
    codes = options.setdefault("rescore_codes", "f16")
    if codes != "f16" and codes not in SQ_CODES:
        raise UserError(f"index_options rescore_codes must be 'f16' or one of {sorted(SQ_CODES)}, not {codes!r}")
    if codes != "f16" and first_stage != "mean":
        raise UserError(f"index_options rescore_codes={codes!r} keeps one list per item: it needs first_stage 'mean'")
    options.setdefault("exact_rescore", 0)  # like nlist for a flat index, ignored where it does not apply
    options.setdefault("seed", 0)
    options.setdefault("max_fetch", DEFAULT_MAX_FETCH)
    if index_type in ("ivf", "ivfpq"):
        most_lists = max(1, min(65536, num_indexed // 39))  # faiss wants >= 39 training points per list
        nlist = options.setdefault("nlist", max(1, min(int(4 * math.sqrt(num_indexed)), most_lists)))
        options.setdefault("nprobe", min(nlist, max(8, nlist // 32)))
        floor = 65536 if index_type == "ivfpq" else 10_000  # PQ's 256 centroids per sub-vector need ~10k+
        options.setdefault("train_size", min(num_indexed, max(40 * nlist, floor), 1_000_000))
    if index_type == "ivfpq":
        pq_bytes = options.setdefault("pq_bytes", 32)
        if dim % pq_bytes:
            raise UserError(f"index_options pq_bytes={pq_bytes} must divide dim={dim}")
        options.setdefault("pq_bits", 8)
    if index_type == "pqfs":
        pq_bytes = options.setdefault("pq_bytes", max(1, dim // 4))
        if dim % (2 * pq_bytes):
            raise UserError(f"index_options pq_bytes={pq_bytes}: pqfs needs 2 x pq_bytes to divide dim={dim}")
        options.setdefault("train_size", min(num_indexed, 65536))
    if index_type == "hnsw":
        options.setdefault("hnsw_m", 32)
        options.setdefault("ef_construction", 80)
        options.setdefault("ef_search", 128)
    return options


def _stores_vectors(options: dict) -> bool:
    """Whether the index keeps ``vectors.f16.npy``: for float16 re-scoring, or to re-rank sq scores exactly."""
    return bool(options.get("rescore")) and (options.get("rescore_codes", "f16") == "f16" or bool(options.get("exact_rescore")))


def _factory_string(index_type: str, options: dict) -> str:
    return {
        "flat": "Flat",
        "ivf": f"IVF{options.get('nlist')},Flat",
        # "np": no polysemous training (a code permutation for Hamming filtering, unused here, and slow)
        "ivfpq": f"IVF{options.get('nlist')},PQ{options.get('pq_bytes')}x{options.get('pq_bits')}np",
        "pqfs": f"PQ{2 * options.get('pq_bytes', 0)}x4fs",
        "hnsw": f"HNSW{options.get('hnsw_m')},Flat",
    }[index_type]


class ChunkSource(Protocol):
    """Items in chunks, in item-id order. :func:`build_index` reads a chunk's vectors twice (a training
    sample, then the add pass), so a source may regenerate them instead of storing them."""

    sizes: Sequence[int]  # items per chunk

    def vectors(self, chunk: int) -> np.ndarray:  # [n, vectors_per_item, dim] float32, a memmap is fine
        ...

    def items(self, chunk: int) -> list[dict]: ...


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")))


def _as_item_vectors(vectors: np.ndarray, vectors_per_item: int, dim: int) -> np.ndarray:
    """[n, vectors_per_item, dim] float32 (``[n, dim]`` accepted when vectors_per_item is 1)."""
    if vectors.ndim == 2 and vectors_per_item == 1:
        vectors = vectors[:, None, :]
    if vectors.ndim != 3 or vectors.shape[1:] != (vectors_per_item, dim):
        expected = f"[n, {vectors_per_item}, {dim}]" + (f" or [n, {dim}]" if vectors_per_item == 1 else "")
        raise ValueError(f"vectors of shape {list(vectors.shape)}; expected {expected}")
    return np.asarray(vectors, dtype=np.float32)


def _mean_vectors(vectors: np.ndarray) -> np.ndarray:
    """Each item's mean vector, renormalised: [n, V, dim] -> [n, dim]."""
    mean = np.asarray(vectors, dtype=np.float32).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def _indexed_vectors(vectors: np.ndarray, first_stage: str) -> np.ndarray:
    """What goes into faiss for a chunk: every vector, or one mean per item."""
    if first_stage == "mean":
        return _mean_vectors(vectors)
    return np.ascontiguousarray(vectors.reshape(-1, vectors.shape[-1]), dtype=np.float32)


def _training_samples(source: ChunkSource, vectors_per_item: int, requests: list[tuple[bool, int]], seed: int) -> list[np.ndarray]:
    """Uniform random samples gathered in one pass over the chunks, one per ``(means, size)`` request:
    ``size`` item means (``means``) or ``size`` of the items' vectors."""
    rng = np.random.default_rng(seed)
    plans = []
    for means, size in requests:
        bounds = np.cumsum([0] + [n * (1 if means else vectors_per_item) for n in source.sizes])
        plans.append((means, bounds, np.sort(rng.choice(int(bounds[-1]), size=min(size, int(bounds[-1])), replace=False)), []))
    for chunk in range(len(source.sizes)):
        vectors = None
        for means, bounds, picked, parts in plans:
            lo, hi = np.searchsorted(picked, bounds[chunk : chunk + 2])
            if lo == hi:
                continue
            rows = picked[lo:hi] - bounds[chunk]
            vectors = source.vectors(chunk) if vectors is None else vectors
            if means:
                parts.append(_mean_vectors(vectors[rows]))
            else:
                parts.append(np.asarray(vectors.reshape(-1, vectors.shape[-1])[rows], dtype=np.float32))
    return [np.ascontiguousarray(np.concatenate(parts)) for _, _, _, parts in plans]


def _item_lists(first_stage: Any, dim: int, count: int, codes: str, sample: np.ndarray) -> Any:
    """An ``IndexIVFScalarQuantizer`` with one inverted list per item, for its vectors' ``codes``, and
    ``first_stage`` (the index of item means) as its coarse quantizer; the quantizer fitted on ``sample``."""
    qtype = getattr(faiss.ScalarQuantizer, SQ_CODES[codes])
    lists = faiss.IndexIVFScalarQuantizer(first_stage, dim, count, qtype, faiss.METRIC_INNER_PRODUCT, False)
    if codes != "sq8":  # with 64 or 16 levels, clipping the 0.1% tails beats spanning the extremes
        lists.sq.rangestat = faiss.ScalarQuantizer.RS_quantiles
        lists.sq.rangestat_arg = 0.001
    lists.sq.train(sample)
    lists.is_trained = True  # the quantizer's means are added chunk by chunk with the items' lists
    return lists


def build_index(
    out_dir: str | Path,
    source: ChunkSource,
    *,
    dim: int,
    vectors_per_item: int,
    index_type: str = "auto",
    index_options: Optional[dict] = None,
    manifest: Optional[dict] = None,
    work_dir: str | Path | None = None,
) -> Path:
    """Build an index from ``source`` in ``work_dir`` (default ``<out_dir>.partial/build``, which must be on
    out_dir's file system) and swap it into ``out_dir``. Memory: one chunk, the training sample, the index.
    :meth:`IndexWriter.finalize` calls this on its chunk files; the benchmark on regenerated chunks."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists():
        raise UserError(f"{out_dir} exists and is not a retrieval index: refusing to replace it; pick another path")
    default_work_dir = out_dir.with_name(out_dir.name + ".partial") / "build"
    work_dir = Path(work_dir) if work_dir else default_work_dir
    sizes = [int(size) for size in source.sizes]
    count = sum(sizes)
    if count == 0:
        raise UserError(f"no items to index for {out_dir}")
    index_options = dict(index_options or {})
    if index_type == "auto":
        index_type, chosen = choose_index(count, vectors_per_item)
        index_options = {**chosen, **index_options}
    if index_type not in INDEX_TYPES:
        raise UserError(f"index_type {index_type!r}: expected 'auto' or one of {INDEX_TYPES}")
    first_stage = index_options.get("first_stage", "all")
    num_indexed = count if first_stage == "mean" else count * vectors_per_item
    options = resolve_index_options(index_type, num_indexed, dim, index_options)
    factory = _factory_string(index_type, options)
    logger.info("building %s index (%s) of %d items, %d faiss vectors, in %s", index_type, factory, count, num_indexed, work_dir)

    if work_dir.exists():
        shutil.rmtree(work_dir)  # left by an interrupted finalize
    work_dir.mkdir(parents=True)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index_type == "hnsw":
        index.hnsw.efConstruction = options["ef_construction"]
    codes = options["rescore_codes"]
    requests = ([(first_stage == "mean", options["train_size"])] if not index.is_trained else []) + (
        [(False, SQ_TRAIN_SIZE)] if codes != "f16" else []
    )
    samples = _training_samples(source, vectors_per_item, requests, options["seed"]) if requests else []
    if not index.is_trained:
        logger.info("training on %d sampled vectors", len(samples[0]))
        index.train(samples.pop(0))
    item_lists = _item_lists(index, dim, count, codes, samples.pop(0)) if codes != "f16" else None
    del samples

    store = None
    if _stores_vectors(options):
        store = np.lib.format.open_memmap(work_dir / VECTORS_FILE, "w+", np.float16, (count, vectors_per_item, dim))
    metadata = MetadataWriter(work_dir)
    start = 0
    for chunk in tqdm(range(len(sizes)), desc=f"indexing ({index_type})", unit="chunk"):
        vectors = _as_item_vectors(source.vectors(chunk), vectors_per_item, dim)
        items = source.items(chunk)
        if len(vectors) != sizes[chunk] or len(items) != sizes[chunk]:
            raise ValueError(f"chunk {chunk}: {len(vectors)} vectors and {len(items)} items, expected {sizes[chunk]}")
        index.add(_indexed_vectors(vectors, first_stage))
        if item_lists is not None:
            flat = _indexed_vectors(vectors, "all")
            ids = np.repeat(np.arange(start, start + len(vectors), dtype=np.int64), vectors_per_item)
            item_lists.add_core(len(flat), faiss.swig_ptr(flat), faiss.swig_ptr(ids), faiss.swig_ptr(ids))
        if store is not None:
            store[start : start + len(vectors)] = vectors
        metadata.append(items)
        start += len(vectors)
    if store is not None:
        store.flush()
        del store
    metadata.close()
    saved = index if item_lists is None else item_lists  # the first stage is inside the item lists
    faiss.write_index(saved, str(work_dir / INDEX_FILE))
    full_manifest = {
        **(manifest or {}),
        "format_version": FORMAT_VERSION,
        "index_type": index_type,
        "index_options": options,
        "faiss_factory": factory,
        "dim": dim,
        "vectors_per_item": vectors_per_item,
        "count": count,
        "num_vectors": count * vectors_per_item,
        "indexed_vectors": int(saved.ntotal),
        "faiss_version": faiss.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_id": uuid.uuid4().hex,
    }
    _write_json(work_dir / MANIFEST_FILE, full_manifest)
    replace_dir(work_dir, out_dir)
    if work_dir == default_work_dir:
        with contextlib.suppress(OSError):  # an IndexWriter's staging dir still holds chunks: it removes it
            default_work_dir.parent.rmdir()
    logger.info("index of %d items ready at %s", count, out_dir)
    return out_dir


class _ChunkFiles:
    """The chunk files of an :class:`IndexWriter`, as a :class:`ChunkSource` (vectors memory-mapped)."""

    def __init__(self, directory: Path, chunk_ids: list[int]):
        self.paths = [directory / f"chunk-{chunk_id:08d}" for chunk_id in chunk_ids]
        self.sizes = [np.load(f"{path}.npy", mmap_mode="r").shape[0] for path in self.paths]

    def vectors(self, chunk: int) -> np.ndarray:
        return np.load(f"{self.paths[chunk]}.npy", mmap_mode="r")

    def items(self, chunk: int) -> list[dict]:
        return json.loads(Path(f"{self.paths[chunk]}.items.json").read_text(encoding="utf-8"))


class IndexWriter:
    """Collects items chunk by chunk in ``<out_dir>.partial/`` and builds the index with :meth:`finalize`.

    ``resume=True`` keeps the chunks of an interrupted build with the same dim, vectors_per_item and caller
    ``manifest`` (an IndexLoadError if they differ); ``resume=False`` discards them. ``index_type`` and
    ``index_options`` only matter to ``finalize``, so they may change between attempts."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        dim: int,
        vectors_per_item: int,
        index_type: str = "auto",
        manifest: Optional[dict] = None,
        resume: bool = True,
        index_options: Optional[dict] = None,
    ):
        if dim <= 0 or vectors_per_item <= 0:
            raise ValueError(f"dim ({dim}) and vectors_per_item ({vectors_per_item}) must be positive")
        if index_type != "auto" and index_type not in INDEX_TYPES:
            raise UserError(f"index_type {index_type!r}: expected 'auto' or one of {INDEX_TYPES}")
        resolve_index_options(index_type if index_type != "auto" else "flat", 1, dim, index_options)  # key check
        manifest = json.loads(json.dumps(manifest or {}))  # JSON types (tuples -> lists), or a TypeError now
        reserved = sorted(set(manifest) & (set(MANIFEST_FIELDS) | {"faiss_factory"}))
        if reserved:
            raise ValueError(f"manifest fields {reserved} are written by the index itself; rename them")
        self.out_dir = Path(out_dir)
        self.staging = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.dim, self.vectors_per_item = dim, vectors_per_item
        self.index_type, self.index_options, self.manifest = index_type, index_options, manifest
        self._chunk_dir = self.staging / "chunks"
        self._finalized = False
        settings = {"dim": dim, "vectors_per_item": vectors_per_item, "manifest": manifest}
        settings_path = self.staging / SETTINGS_FILE
        for parent, name in ((self.out_dir.parent, self.out_dir.name), (self.staging.parent, self.staging.name)):
            for leftover in remove_staging(parent, name):
                logger.warning("removed %s, left by an interrupted build", leftover)
        if self.staging.exists() and not resume:
            remove_dir(self.staging)
        elif settings_path.exists():
            staged = _read_json(settings_path)
            if staged != settings:
                diff = ", ".join(_differences(staged, settings))
                raise IndexLoadError(
                    f"{self.staging} holds an interrupted build with other settings ({diff}): "
                    "build with the same settings to resume it, or discard it (resume=False)"
                )
        elif self._chunk_dir.exists() and any(self._chunk_dir.iterdir()):
            raise IndexLoadError(f"{settings_path} is missing next to chunk files: pass resume=False to discard them")
        self._chunk_dir.mkdir(parents=True, exist_ok=True)
        _write_json(settings_path, settings)
        if resume and self.completed_chunks():
            logger.info("resuming the build in %s: %d chunks already written", self.staging, len(self.completed_chunks()))

    def completed_chunks(self) -> set[int]:
        """Chunk ids written in full (their items file, written after the vectors, is the commit mark)."""
        done = set()
        for path in self._chunk_dir.glob("chunk-*.items.json"):
            stem = path.name[: -len(".items.json")]
            if (self._chunk_dir / f"{stem}.npy").exists():
                done.add(int(stem[len("chunk-") :]))
        return done

    def write_chunk(self, chunk_id: int, vectors: np.ndarray, items: list[dict]) -> None:
        """Store one chunk: ``vectors`` [n, vectors_per_item, dim] (or [n, dim] for 1), L2-normalised, and
        ``n`` JSON-serialisable metadata dicts. Rewriting a chunk id replaces it."""
        if self._finalized:
            raise RuntimeError(f"{self.out_dir}: this writer is finalized; start a new IndexWriter")
        if chunk_id < 0:
            raise ValueError(f"chunk_id must be >= 0, not {chunk_id}")
        vectors = np.ascontiguousarray(_as_item_vectors(vectors, self.vectors_per_item, self.dim))
        if len(items) != len(vectors):
            raise ValueError(f"chunk {chunk_id}: {len(vectors)} items' vectors but {len(items)} metadata dicts")
        norms = np.linalg.norm(vectors, axis=-1)
        if len(vectors) and not np.all(np.abs(norms - 1) < 1e-2):
            raise ValueError(f"chunk {chunk_id}: vectors must be L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})")
        text = json.dumps(list(items), ensure_ascii=False).encode("utf-8")
        stem = self._chunk_dir / f"chunk-{chunk_id:08d}"
        atomic_write(Path(f"{stem}.npy"), lambda f: np.save(f, vectors))
        atomic_write(Path(f"{stem}.items.json"), lambda f: f.write(text))

    def finalize(self) -> Path:
        """Build the index from chunks 0..last (all must be there) into ``out_dir``; remove the staging dir."""
        if self._finalized:
            raise RuntimeError(f"{self.out_dir}: this writer is already finalized")
        chunk_ids = sorted(self.completed_chunks())
        if not chunk_ids:
            raise ValueError(f"no chunks written to {self._chunk_dir}: nothing to index")
        missing = sorted(set(range(chunk_ids[-1] + 1)) - set(chunk_ids))
        if missing:
            raise ValueError(f"chunks {missing[:20]} of 0..{chunk_ids[-1]} are missing in {self._chunk_dir}: write them first")
        build_index(
            self.out_dir,
            _ChunkFiles(self._chunk_dir, chunk_ids),
            dim=self.dim,
            vectors_per_item=self.vectors_per_item,
            index_type=self.index_type,
            index_options=self.index_options,
            manifest=self.manifest,
            work_dir=self.staging / "build",
        )
        remove_dir(self.staging)
        self._finalized = True
        return self.out_dir


def _differences(staged: Any, now: Any, key: str = "") -> list[str]:
    """The settings that differ, by dotted key, e.g. "manifest.corpus.fingerprint: 'ab12' staged, 'cd34' now"."""
    if isinstance(staged, dict) and isinstance(now, dict):
        keys = sorted(set(staged) | set(now))
        return [d for k in keys for d in _differences(staged.get(k), now.get(k), f"{key}.{k}" if key else k)]
    return [] if staged == now else [f"{key}: {staged!r} staged, {now!r} now"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexLoadError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexLoadError(f"{path} is unreadable or not JSON ({error}): rebuild the index") from None


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        hint = ""
        if path.with_name(path.name + ".partial").is_dir():
            hint = f"; an unfinished build is in {path.name}.partial/: rerun the build to resume and finalize it"
        raise IndexLoadError(f"{path}: no retrieval index there (not a directory){hint}")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise IndexLoadError(f"{manifest_path} is missing: {path} is not a finished retrieval index; rebuild it")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise IndexLoadError(f"{manifest_path} is not a JSON object: rebuild the index")
    bad = [name for name, kind in MANIFEST_FIELDS.items() if not isinstance(manifest.get(name), kind)]
    if bad:
        raise IndexLoadError(f"{manifest_path} lacks valid fields {bad}: rebuild the index")
    if manifest["format_version"] != FORMAT_VERSION:
        raise IndexLoadError(
            f"{manifest_path} has format_version {manifest['format_version']}, this code reads {FORMAT_VERSION}: "
            "rebuild the index with this version"
        )
    if manifest["index_type"] not in INDEX_TYPES:
        raise IndexLoadError(f"{manifest_path}: unknown index_type {manifest['index_type']!r}; expected one of {INDEX_TYPES}")
    return manifest


# Exactness of the flat (and exact-rescored) item ranking, for k items of V vectors each:
# (1) Text query. Take the top k*V vectors by score. Each item owns at most V of them, so they cover at
#     least k distinct items. Walking the list best first, an item's first vector is its best one, so
#     ordering items by first appearance orders them by max-over-vectors score. An item absent from the
#     list has every vector at or below the list's last score, hence at or below the k-th item found:
#     the first k distinct items are exactly the top k by max score.
# (2) Multi-vector query q_1..q_m. Let item t be in the overall top k, its score s(t) reached at q_a. In
#     q_a's own item ranking, an item u above t has s(u) >= s_a(u) > s_a(t) = s(t), so fewer than k items
#     precede t: t is in q_a's top k, which (1) returns with the exact score s(t). Merging the m lists by
#     max gives every top-k item its exact score and any other item a score <= its true score <= the
#     k-th best, so the merged top k is exact.
# Ties rank the smaller item id first (among the items returned).
def _top_items(item_ids: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of [nq, c] candidate (item id, score) pairs (id -1 = none): each item's best score, the
    top ``k`` items by score (then by id), as (ids, scores) arrays."""
    nq, per_query = item_ids.shape
    query = np.repeat(np.arange(nq), per_query)
    ids, vals = item_ids.ravel(), scores.ravel()
    keep = ids >= 0
    query, ids, vals = query[keep], ids[keep], vals[keep]
    order = np.lexsort((-vals, ids, query))  # per query, per item, best score first
    query, ids, vals = query[order], ids[order], vals[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (query[1:] != query[:-1]) | (ids[1:] != ids[:-1])
    query, ids, vals = query[first], ids[first], vals[first]
    order = np.lexsort((ids, -vals, query))  # per query, best score first, then smaller id
    query, ids, vals = query[order], ids[order], vals[order]
    starts = np.searchsorted(query, np.arange(nq + 1))
    return [(ids[lo : min(lo + k, hi)], vals[lo : min(lo + k, hi)]) for lo, hi in zip(starts[:-1], starts[1:])]


class RetrievalIndex:
    """A loaded index: ``search`` returns the top-k items per query, ``items`` their metadata."""

    def __init__(self, path: Path, manifest: dict, index: Any, store: MetadataStore, vectors: Optional[ItemVectors], use_gpu: Optional[bool]):
        self.path = path
        self.manifest = manifest
        self.index_type: str = manifest["index_type"]
        self.options: dict = manifest["index_options"]
        self.dim: int = manifest["dim"]
        self.vectors_per_item: int = manifest["vectors_per_item"]
        self.rescore_codes: str = self.options.get("rescore_codes", "f16")
        self._cpu_index = index
        self._index = self._to_gpu(index, use_gpu)
        self._store = store
        self._vectors = vectors
        self._lock = threading.Lock()  # search parameters are set on the shared faiss index

    @classmethod
    def load(cls, path: str | Path, use_gpu: Optional[bool] = None) -> "RetrievalIndex":
        """Open the index at ``path``; ``use_gpu``: None = GPU(s) if faiss sees any, True = require, False = CPU.

        Re-reads the manifest afterwards: if a rebuild swapped a new index in meanwhile, it loads again."""
        path = Path(path)
        recover_dir(path)
        for _ in range(3):
            manifest = _read_manifest(path)
            try:
                index = cls._open(path, manifest, use_gpu)
            except IndexLoadError:
                if _read_manifest(path)["build_id"] != manifest["build_id"]:
                    continue
                raise
            if _read_manifest(path)["build_id"] == manifest["build_id"]:
                return index
        raise IndexLoadError(f"{path} kept being replaced while loading; retry once the rebuild is done")

    @classmethod
    def _open(cls, path: Path, manifest: dict, use_gpu: Optional[bool]) -> "RetrievalIndex":
        index_path = path / INDEX_FILE
        if not index_path.exists():
            raise IndexLoadError(f"{index_path} is missing: rebuild the index")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as error:
            raise IndexLoadError(f"{index_path} is not a readable faiss index ({error}): rebuild the index") from None
        if index.ntotal != manifest["indexed_vectors"] or index.d != manifest["dim"]:
            raise IndexLoadError(
                f"{index_path} holds {index.ntotal} vectors of dim {index.d}, {path / MANIFEST_FILE} says "
                f"{manifest['indexed_vectors']} of dim {manifest['dim']}: rebuild the index"
            )
        has_vectors = _stores_vectors(manifest["index_options"])
        for name in (ITEMS_FILE, OFFSETS_FILE) + ((VECTORS_FILE,) if has_vectors else ()):
            if not (path / name).exists():
                raise IndexLoadError(f"{path / name} is missing: rebuild the index")
        store = MetadataStore(path)
        if len(store) != manifest["count"]:
            raise IndexLoadError(f"{path / OFFSETS_FILE} lists {len(store)} items, the manifest {manifest['count']}: rebuild the index")
        vectors = None
        if has_vectors:
            vectors = ItemVectors(path / VECTORS_FILE)
            if vectors.shape != (manifest["count"], manifest["vectors_per_item"], manifest["dim"]):
                raise IndexLoadError(f"{path / VECTORS_FILE} has shape {list(vectors.shape)}, not the manifest's: rebuild the index")
        return cls(path, manifest, index, store, vectors, use_gpu)

    def _to_gpu(self, index: Any, use_gpu: Optional[bool]) -> Any:
        """The index on all GPUs faiss sees (``use_gpu`` None or True), else the CPU index."""
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu and not gpus:
            raise IndexLoadError(f"use_gpu=True but faiss {faiss.__version__} sees no GPU: install faiss-gpu (pip install -e .[gpu])")
        if use_gpu is False or not gpus:
            return index
        if self.index_type in ("hnsw", "pqfs") or self.rescore_codes != "f16":
            logger.info("faiss has no GPU version of %s's index (%s): searching it on the CPU", self.path, self.index_type)
            return index
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = self.index_type == "ivfpq"  # float16 PQ lookup tables; IVF-Flat and Flat stay float32
        logger.info("moving %s to %d GPU(s)", self.path, gpus)
        return faiss.index_cpu_to_all_gpus(index, co=options)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def items(self, item_ids: Sequence[int]) -> list[dict]:
        """The metadata dicts of ``item_ids``, in that order."""
        return self._store.get(item_ids)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        rescore: Optional[int] = None,
        exact_rescore: Optional[int] = None,
    ) -> list[list[Hit]]:
        """Top-``k`` items per query, best first. ``queries``: [nq, dim] (text) or [nq, Vq, dim] (image; the
        score is also the max over the query's vectors), L2-normalised. ``nprobe`` (IVF), ``ef_search``
        (HNSW), ``rescore`` (candidates re-scored) and ``exact_rescore`` (of those, re-ranked exactly from
        float16 after sq codes) override the manifest's defaults."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 2:
            queries = queries[:, None, :]
        if queries.ndim != 3 or queries.shape[-1] != self.dim:
            raise ValueError(f"queries of shape {list(queries.shape)}; expected [nq, {self.dim}] or [nq, Vq, {self.dim}]")
        if k <= 0:
            raise ValueError(f"k must be positive, not {k}")
        rescore = self.options.get("rescore", 0) if rescore is None else rescore
        if rescore and self._vectors is None and self.rescore_codes == "f16":
            raise ValueError(f"{self.path} was built without rescore, so it stores no vectors to re-score with")
        if self.options["first_stage"] == "mean" and not rescore:
            raise ValueError(f"{self.path} has a 'mean' first stage: rescore must be > 0")
        if self.rescore_codes == "f16":
            exact = rescore  # every candidate of the first stage is re-scored from float16
            with self._lock:
                ranked = self._first_stage(queries, max(k, rescore), nprobe, ef_search)
        else:
            exact = self.options.get("exact_rescore", 0) if exact_rescore is None else exact_rescore
            if exact and self._vectors is None:
                raise ValueError(f"{self.path} was built without exact_rescore, so it stores no float16 vectors")
            with self._lock:
                ranked = self._scan_item_lists(queries, max(k, exact), rescore, nprobe, ef_search)
        ranked = self._rescore(queries, ranked, k) if exact else [(ids[:k], scores[:k]) for ids, scores in ranked]
        return [[Hit(int(i), float(s)) for i, s in zip(ids, scores)] for ids, scores in ranked]

    def _first_stage(self, queries: np.ndarray, wanted: int, nprobe: Optional[int], ef_search: Optional[int]) -> list:
        """Top ``wanted`` items per query from the faiss index (exact for flat, see the proof above)."""
        nq, query_vectors, dim = queries.shape
        per_item = 1 if self.options["first_stage"] == "mean" else self.vectors_per_item
        fetch = wanted * per_item
        if self.index_type != "flat":
            fetch = max(wanted, min(fetch, self.options["max_fetch"]))
        fetch = min(fetch, int(self._cpu_index.ntotal))
        index = self._index if fetch <= GPU_MAX_K else self._cpu_index
        if self.index_type == "flat" and index is self._cpu_index:
            return self._scan_flat(queries, wanted, per_item)
        self._set_search_parameters(index, nprobe, ef_search, fetch, gpu=index is not self._cpu_index)
        scores, ids = index.search(np.ascontiguousarray(queries.reshape(nq * query_vectors, dim)), fetch)
        item_ids = np.where(ids >= 0, ids // per_item, -1)
        return _top_items(item_ids.reshape(nq, -1), scores.reshape(nq, -1), wanted)

    def _scan_flat(self, queries: np.ndarray, wanted: int, per_item: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The exact top ``wanted`` items per query, by BLAS products of the queries with blocks of the flat
        index's vectors (a matrix-vector product for one query vector) on all threads, each block reduced
        to its items' maxima at once: faiss keeps a heap per query of every vector fetched, which costs
        more than the product when ``wanted * per_item`` is large, and scans a single query on one thread."""
        index = self._cpu_index
        vectors = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        nq, query_vectors, dim = queries.shape
        rows = queries.reshape(nq * query_vectors, dim)
        items = index.ntotal // per_item
        block = max(1, FLAT_BLOCK_SCORES // (per_item * len(rows)))  # items per product
        best_ids, best_scores = np.empty((nq, 0), np.int64), np.empty((nq, 0), np.float32)
        for start in range(0, items, block):
            stop = min(items, start + block)
            chunk = vectors[start * per_item : stop * per_item]
            scores = (chunk @ rows[0])[:, None] if len(rows) == 1 else chunk @ rows.T
            scores = scores.reshape(stop - start, per_item, nq, query_vectors).max(axis=(1, 3)).T
            best_ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, stop), (nq, stop - start))], axis=1)
            best_scores = np.concatenate([best_scores, scores], axis=1)
            if best_ids.shape[1] > wanted:
                keep = np.argpartition(-best_scores, wanted - 1, axis=1)[:, :wanted]
                best_ids, best_scores = np.take_along_axis(best_ids, keep, 1), np.take_along_axis(best_scores, keep, 1)
        ranked = []
        for ids, scores in zip(best_ids, best_scores):
            order = np.lexsort((ids, -scores))
            ranked.append((ids[order], scores[order]))
        return ranked

    def _scan_item_lists(self, queries: np.ndarray, wanted: int, rescore: int, nprobe: Optional[int], ef_search: Optional[int]) -> list:
        """The top ``wanted`` items by their sq-coded vectors among the ``rescore`` best items by mean, in one
        faiss call; single queries scan their lists on all threads, batches a query per thread."""
        nq, query_vectors, dim = queries.shape
        lists = self._cpu_index
        lists.nprobe = min(rescore, len(self))
        lists.parallel_mode = 1 if nq * query_vectors == 1 else 0
        self._set_search_parameters(faiss.downcast_index(lists.quantizer), nprobe, ef_search, lists.nprobe)
        fetch = min(wanted * self.vectors_per_item, int(lists.ntotal))  # k*V vectors hold >= k distinct items
        scores, ids = lists.search(np.ascontiguousarray(queries.reshape(nq * query_vectors, dim)), fetch)
        return _top_items(ids.reshape(nq, -1), scores.reshape(nq, -1), wanted)

    def _set_search_parameters(self, index: Any, nprobe: Optional[int], ef_search: Optional[int], fetch: int, gpu: bool = False) -> None:
        space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
        if self.index_type in ("ivf", "ivfpq"):
            space.set_index_parameter(index, "nprobe", min(nprobe or self.options["nprobe"], self.options["nlist"]))
        elif self.index_type == "hnsw":
            space.set_index_parameter(index, "efSearch", max(ef_search or self.options["ef_search"], fetch))

    def _rescore(self, queries: np.ndarray, ranked: list, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Exact max-over-vectors scores of each query's candidates (float16 stored vectors), top ``k``."""
        rescored = []
        for query, (ids, _) in zip(queries, ranked):
            ids = np.sort(ids)  # reads in file order
            vectors = self._vectors[ids].reshape(-1, self.dim)
            scores = (vectors @ query.T).reshape(len(ids), self.vectors_per_item * len(query)).max(axis=1)
            best = np.lexsort((ids, -scores))[:k]
            rescored.append((ids[best], scores[best]))
        return rescored
