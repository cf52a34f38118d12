"""Embed a corpus into files, in clip-retrieval's layout: `lavis-lite embed [--config YAML] [key=value ...]`.

    output_dir/img_emb/img_emb_{i}.npy              [N, E] float16: the mean of each image's query vectors, normalised
    output_dir/img_emb_queries/img_emb_{i}.npy      [N, Q, E] float16: every query vector (what ITC ranks by)
    output_dir/text_emb/text_emb_{i}.npy            [N, E] float16: each image's first caption (zeros: no caption)
    output_dir/metadata/metadata_{i}.parquet        key, image_path, caption, captions, locator (JSON)
    output_dir/partitions/partition_{i}.json        written last: the model, the corpus, counts

Partition i of n is a contiguous run of the corpus's entries (in corpus order). Under `accelerate launch` or
`torchrun` each rank embeds its own partition (RANK of WORLD_SIZE); elsewhere set `partition=i num_partitions=n`,
e.g. from a Slurm array (`partition=$SLURM_ARRAY_TASK_ID num_partitions=$SLURM_ARRAY_TASK_COUNT`) or one Spark /
Ray task per partition. A partition that is already written for the same model and corpus is skipped, so a
failed one is re-run alone. `lavis-lite index embeddings=DIR` builds an index from all partitions.

examples:
  lavis-lite embed checkpoint=runs/stage1-demo corpus.path=data/synthetic/val output_dir=runs/demo-embeddings
  accelerate launch --num_processes 4 -m lavis_lite.cli embed checkpoint=... corpus.path=shards/ output_dir=emb/
  lavis-lite index embeddings=runs/demo-embeddings output_dir=runs/demo-index
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from lavis_lite.config import ConfigError, at_least
from lavis_lite.data import SkipCounter
from lavis_lite.errors import CommandParser, UserError
from lavis_lite.inference.features import load_model_and_preprocess
from lavis_lite.io import atomic_path, atomic_write_text, check_writable
from lavis_lite.precision import resolve_device, resolve_dtype

from .config import EmbedConfig, load_embed_config
from .corpus import Corpus

log = logging.getLogger("lavis_lite.retrieval")
FOLDERS = {"img_emb": "img_emb_{i}.npy", "img_emb_queries": "img_emb_{i}.npy", "text_emb": "text_emb_{i}.npy",
           "metadata": "metadata_{i}.parquet", "partitions": "partition_{i}.json"}


def partition_of(cfg: EmbedConfig) -> tuple[int, int]:
    """(i, n): the config's, else the launcher's RANK / WORLD_SIZE, else (0, 1)."""
    if cfg.num_partitions:
        i, n = cfg.partition, cfg.num_partitions
    else:
        i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= i < n:
        raise ConfigError(f"partition={i} of num_partitions={n}: give 0 <= partition < num_partitions")
    return i, n


def path_of(root: Path, folder: str, i: int) -> Path:
    return root / folder / FOLDERS[folder].format(i=i)


def run(cfg: EmbedConfig) -> Path:
    """Embed this process's partition (unless it is already done) and return its record's path."""
    for key, value in (("checkpoint", cfg.checkpoint), ("corpus.path", cfg.corpus.path), ("output_dir", cfg.output_dir)):
        if not value:
            raise ConfigError(f"{key} is not set: give it as {key}=...")
    at_least("", cfg, batch_size=1, num_workers=0)
    check_writable(cfg.output_dir, "output_dir", directory=True)
    i, n = partition_of(cfg)
    root = Path(cfg.output_dir)
    corpus = Corpus(cfg.corpus.path, cfg.corpus.kind, cfg.corpus.image_root, cfg.corpus.max_words, max_pixels=cfg.corpus.max_image_pixels)
    device = resolve_device(cfg.device)
    model, vis_processors, _ = load_model_and_preprocess(cfg.checkpoint, device=device, dtype=resolve_dtype(cfg.precision, device, "precision"))
    record = path_of(root, "partitions", i)
    about = {"partition": i, "num_partitions": n, "checkpoint_id": model.checkpoint_id,
             "source": os.path.abspath(model.source) if os.path.exists(model.source) else model.source,
             "embed_dim": model.embed_dim, "num_queries": model.num_queries, "image_size": model.image_size,
             "corpus": corpus.describe()}
    if record.is_file():
        done = json.loads(record.read_text())
        if {k: done.get(k) for k in about} == about:
            log.info("partition %d of %d is already embedded in %s: skipped", i, n, root)
            return record
    skipped = SkipCounter()
    entries = list(corpus.entries(skipped))
    mine = entries[i * len(entries) // n : (i + 1) * len(entries) // n]
    queries, texts, rows = [], [], []
    with tqdm(total=len(mine), desc=f"embedding partition {i}/{n}", unit="img") as progress:
        for kept, pixels in corpus.pixel_batches(mine, vis_processors["eval"], cfg.batch_size, skipped, cfg.num_workers):
            queries.append(model.image_vectors(pixels.to(device)).cpu().numpy())
            captioned = [e.captions[0] for e in kept if e.captions]
            vectors = iter(model.text_vectors(captioned).cpu().numpy() if captioned else [])
            texts.append(np.stack([next(vectors) if e.captions else np.zeros(model.embed_dim, np.float32) for e in kept]))
            rows += [_metadata_row(e) for e in kept]
            progress.update(len(kept))
    q = np.concatenate(queries) if queries else np.zeros((0, model.num_queries, model.embed_dim), np.float32)
    mean = q.mean(axis=1)
    mean /= np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    t = np.concatenate(texts) if texts else np.zeros((0, model.embed_dim), np.float32)
    for folder, array in (("img_emb", mean), ("img_emb_queries", q), ("text_emb", t)):
        _save_npy(path_of(root, folder, i), array.astype(np.float16))
    _save_parquet(path_of(root, "metadata", i), rows)
    path_of(root, "partitions", i).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({**about, "count": len(rows), "skipped": skipped.as_dict()}, indent=2) + "\n")
    log.info("partition %d of %d: %d images embedded, %s", i, n, len(rows), skipped.summary())
    return record


def _metadata_row(entry) -> dict[str, Any]:
    from .corpus import describe_locator

    return {"key": entry.key, "image_path": describe_locator(entry.locator), "caption": entry.captions[0] if entry.captions else None,
            "captions": list(entry.captions), "locator": json.dumps(entry.locator)}


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _save_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("key", pa.string()), ("image_path", pa.string()), ("caption", pa.string()),
                        ("captions", pa.list_(pa.string())), ("locator", pa.string())])
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


def read_partitions(root: str | Path) -> list[dict]:
    """Every partition's record, in order; a UserError naming the missing ones or a mixed model / corpus."""
    root = Path(root)
    records = sorted((json.loads(p.read_text()) for p in (root / "partitions").glob("partition_*.json")), key=lambda r: r["partition"])
    if not records:
        raise UserError(f"embeddings={root} holds no partitions/partition_*.json: run lavis-lite embed output_dir={root}")
    n = records[0]["num_partitions"]
    missing = sorted(set(range(n)) - {r["partition"] for r in records})
    if missing:
        raise UserError(f"embeddings={root}: partitions {missing} of {n} are missing: run lavis-lite embed for them (partition=i num_partitions={n})")
    for key in ("num_partitions", "checkpoint_id", "corpus"):
        if len({json.dumps(r[key], sort_keys=True) for r in records}) > 1:
            raise UserError(f"embeddings={root}: the partitions differ in {key}: re-embed them with one model and corpus")
    return records


def partition_chunks(root: str | Path, target: str) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """Per partition: the vectors an index of `target` holds (float32, normalised) and their items' metadata."""
    import pyarrow.parquet as pq

    root = Path(root)
    for record in read_partitions(root):
        i = record["partition"]
        table = pq.read_table(path_of(root, "metadata", i)).to_pylist()
        if target == "image":
            vectors = np.load(path_of(root, "img_emb_queries", i)).astype(np.float32)
            items = [{"key": r["key"], "locator": json.loads(r["locator"]), "captions": list(r["captions"])} for r in table]
        else:
            text = np.load(path_of(root, "text_emb", i)).astype(np.float32)
            keep = [j for j, r in enumerate(table) if r["caption"] is not None]
            vectors = text[keep]
            items = [{"caption": table[j]["caption"], "key": table[j]["key"], "locator": json.loads(table[j]["locator"])} for j in keep]
        if len(vectors) != len(table if target == "image" else items):
            raise UserError(f"embeddings={root}: partition {i}'s vectors and metadata differ in length: re-embed it")
        yield vectors / np.linalg.norm(vectors, axis=-1, keepdims=True).clip(1e-12), items


def build_parser(prog: str = "lavis-lite embed") -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML of embed settings (optional)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings, e.g. checkpoint=runs/stage1-demo")
    return parser


def main(argv: list[str] | None = None, prog: str = "lavis-lite embed") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        record = run(load_embed_config(args.config, args.overrides))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"embedded: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
