"""Build a retrieval index: `lavis-lite index [--config YAML] [key=value ...]`.

Embeds a corpus (webdataset shards, an image folder, or a Karpathy JSON / JSONL / CSV annotation file; see
retrieval/corpus.py) with a stage-1 model and writes a FAISS index with per-item metadata to `output_dir`:

  target=image   one item per image: its query vectors (text -> image search); metadata: key, locator, captions
  target=text    one item per caption: one vector (image -> text search); metadata: caption, key, locator

The index is written in chunks of `chunk_size` corpus images: run the same command again after an
interruption and it continues with the first unfinished chunk.

examples:
  lavis-lite index --config configs/retrieval/demo.yaml
  lavis-lite index --config configs/retrieval/demo.yaml target=text output_dir=runs/retrieval-demo/text-index
  lavis-lite index checkpoint=runs/stage1 corpus.path=photos/ output_dir=runs/photos-index device=cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lavis_lite.config import ConfigError, at_least
from lavis_lite.data import SkipCounter
from lavis_lite.errors import CommandParser, UserError
from lavis_lite.io import check_writable
from lavis_lite.inference.features import Blip2FeatureExtractor, load_model_and_preprocess
from lavis_lite.precision import resolve_device, resolve_dtype

from .config import TARGETS, BuildConfig, load_build_config
from .corpus import CORPUS_KINDS, Corpus, CorpusEntry, ImageProcessor, batched
from .embed import partition_chunks, read_partitions
from .index import INDEX_OPTIONS, INDEX_TYPES, IndexWriter

DEFAULT_CONFIG = "retrieval/demo"
log = logging.getLogger("lavis_lite.retrieval")


def check_config(cfg: BuildConfig) -> None:
    """ConfigError naming the first missing or invalid setting."""
    needed = (("output_dir", cfg.output_dir),) if cfg.embeddings else (
        ("checkpoint", cfg.checkpoint), ("corpus.path", cfg.corpus.path), ("output_dir", cfg.output_dir))
    for key, value in needed:
        if not value:
            raise ConfigError(f"{key} is not set: give it in the YAML or as {key}=...")
    if cfg.target not in TARGETS:
        raise ConfigError(f"target={cfg.target!r}: choose image (text -> image search) or text (image -> text)")
    at_least("", cfg, batch_size=1, chunk_size=1, num_workers=0)
    at_least("corpus", cfg.corpus, max_words=1, max_image_pixels=1)
    if cfg.corpus.kind not in CORPUS_KINDS:
        raise ConfigError(f"corpus.kind={cfg.corpus.kind!r}: choose from {list(CORPUS_KINDS)}")
    if cfg.index_type != "auto" and cfg.index_type not in INDEX_TYPES:
        raise ConfigError(f"index_type={cfg.index_type!r}: choose auto or one of {list(INDEX_TYPES)}")
    unknown = sorted(set(cfg.index_options) - set(INDEX_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown index_options {unknown}: known are {sorted(INDEX_OPTIONS)}")
    resolve_dtype(cfg.precision, "cpu", "precision")
    check_writable(cfg.output_dir, "output_dir", directory=True)


def index_manifest(cfg: BuildConfig, model: Blip2FeatureExtractor, corpus: Corpus) -> dict[str, Any]:
    """What the index was built from: searches check the model against it."""
    source = os.path.abspath(model.source) if os.path.exists(model.source) else model.source
    return {
        "checkpoint_id": model.checkpoint_id,
        "source": source,
        "embed_dim": model.embed_dim,
        "num_queries": model.num_queries,
        "image_size": model.image_size,
        "target": cfg.target,
        "corpus": corpus.describe(),
    }


def embed_images(
    model: Blip2FeatureExtractor,
    processor: ImageProcessor,
    corpus: Corpus,
    entries: list[CorpusEntry],
    cfg: BuildConfig,
    skipped: SkipCounter,
) -> tuple[np.ndarray, list[dict]]:
    """Image items of a chunk: vectors [n, Q, E] and their metadata (undecodable images left out, counted)."""
    vectors, items = [], []
    for kept, pixels in corpus.pixel_batches(entries, processor, cfg.batch_size, skipped, cfg.num_workers):
        vectors.append(model.image_vectors(pixels).cpu().numpy())
        items += [{"key": e.key, "locator": e.locator, "captions": e.captions} for e in kept]
    empty = np.zeros((0, model.num_queries, model.embed_dim), np.float32)
    return (np.concatenate(vectors) if vectors else empty), items


def embed_texts(
    model: Blip2FeatureExtractor, entries: list[CorpusEntry], cfg: BuildConfig
) -> tuple[np.ndarray, list[dict]]:
    """Caption items of a chunk: vectors [n, E] and their metadata."""
    items = [{"caption": c, "key": e.key, "locator": e.locator} for e in entries for c in e.captions]
    vectors = [model.text_vectors([i["caption"] for i in part]).cpu().numpy() for part in batched(items, cfg.batch_size)]
    return (np.concatenate(vectors) if vectors else np.zeros((0, model.embed_dim), np.float32)), items


def run_from_embeddings(cfg: BuildConfig) -> Path:
    """The index of `lavis-lite embed`'s files in `cfg.embeddings` (every partition), one chunk per partition."""
    records = read_partitions(cfg.embeddings)
    about = records[0]
    manifest = {key: about[key] for key in ("checkpoint_id", "source", "embed_dim", "num_queries", "image_size", "corpus")}
    text = cfg.target == "text"
    writer = IndexWriter(
        cfg.output_dir, dim=about["embed_dim"], vectors_per_item=1 if text else about["num_queries"],
        index_type=cfg.index_type, manifest={**manifest, "target": cfg.target}, resume=cfg.resume,
        index_options=dict(cfg.index_options),
    )
    done = writer.completed_chunks()
    for chunk_id, (vectors, items) in enumerate(partition_chunks(cfg.embeddings, cfg.target)):
        if chunk_id not in done:
            writer.write_chunk(chunk_id, vectors, items)
    log.info("embeddings %s: %d partitions", cfg.embeddings, len(records))
    return writer.finalize()


def run(cfg: BuildConfig) -> Path:
    """Embed the corpus (or read `cfg.embeddings`) and write (or finish) the index in `cfg.output_dir`; returns
    the index directory."""
    check_config(cfg)
    if cfg.embeddings:
        return run_from_embeddings(cfg)
    device = resolve_device(cfg.device)
    text = cfg.target == "text"
    corpus = Corpus(
        cfg.corpus.path, cfg.corpus.kind, cfg.corpus.image_root, cfg.corpus.max_words, require_captions=text,
        max_pixels=cfg.corpus.max_image_pixels,
    )
    dtype = resolve_dtype(cfg.precision, device, "precision")
    model, vis_processors, _ = load_model_and_preprocess(cfg.checkpoint, device=device, dtype=dtype)
    writer = IndexWriter(
        cfg.output_dir,
        dim=model.embed_dim,
        vectors_per_item=1 if text else model.num_queries,
        index_type=cfg.index_type,
        manifest=index_manifest(cfg, model, corpus),
        resume=cfg.resume,
        index_options=dict(cfg.index_options),
    )
    done = writer.completed_chunks()
    skipped = SkipCounter()
    written = 0
    with tqdm(desc=f"indexing ({cfg.target}) -> {cfg.output_dir}", unit="img") as progress:
        for chunk_id, entries in enumerate(batched(corpus.entries(skipped), cfg.chunk_size)):
            if chunk_id not in done:
                start = time.perf_counter()
                if text:
                    vectors, items = embed_texts(model, list(corpus.decodable(entries, skipped, cfg.num_workers)), cfg)
                else:
                    vectors, items = embed_images(model, vis_processors["eval"], corpus, entries, cfg, skipped)
                writer.write_chunk(chunk_id, vectors, items)
                written += len(items)
                seconds = time.perf_counter() - start
                log.info("chunk %d: %d images -> %d items in %.1f s", chunk_id, len(entries), len(items), seconds)
            progress.update(len(entries))
    if not done and not written:
        usable = "captions" if text else "images"
        raise UserError(f"corpus {cfg.corpus.path} has no usable {usable} ({skipped.summary()})")
    # Chunks written by an earlier, interrupted run were not decoded again: their image skips are not counted here.
    log.info("corpus %s: %s", cfg.corpus.path, skipped.summary())
    return writer.finalize()


def build_parser(prog: str = "lavis-lite index") -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="RECIPE", help=f"a YAML path or a packaged recipe name (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. target=text")
    return parser


def main(argv: list[str] | None = None, prog: str = "lavis-lite index") -> int:
    """Build the index; exit status 0, or 2 with `error: ...` on stderr for a bad config, corpus or checkpoint."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = run(load_build_config(args.config, args.overrides))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"index written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
