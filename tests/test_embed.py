"""`lavis-lite embed`: clip-retrieval's file layout; two processes under `accelerate launch` write partitions
whose union equals one process's files, and the index built from them answers as the one built from the corpus;
a partition already written is skipped, a missing one is named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from retrieval import build, embed
from retrieval.index import RetrievalIndex
from test_retrieval_cli import IMAGES, assets, indexes  # noqa: F401  (fixtures: a tiny stage-1 run and its indexes)

ROOT = Path(__file__).resolve().parent.parent


def embed_args(assets, out):  # noqa: F811
    root, runs = assets
    return [f"checkpoint={runs['model']}", f"corpus.path={root / 'data/val'}", f"output_dir={out}", "batch_size=5",
            "num_workers=2", "device=cpu", "precision=fp32"]


def test_two_processes_embed_what_one_does_and_the_index_answers_as_the_corpus_one(assets, indexes, tmp_path, capsys):  # noqa: F811
    assert embed.main(embed_args(assets, tmp_path / "one")) == 0
    for folder, name, shape in (("img_emb", "img_emb_0.npy", (IMAGES, 16)), ("img_emb_queries", "img_emb_0.npy", (IMAGES, 8, 16)),
                                ("text_emb", "text_emb_0.npy", (IMAGES, 16))):
        array = np.load(tmp_path / "one" / folder / name)
        assert array.shape == shape and array.dtype == np.float16
    assert pq.read_table(tmp_path / "one/metadata/metadata_0.parquet").column_names == ["key", "image_path", "caption", "captions", "locator"]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lavis_lite.cli", "embed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*launcher, *embed_args(assets, tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = embed.read_partitions(tmp_path / "two")
    assert [r["partition"] for r in records] == [0, 1] and sum(r["count"] for r in records) == IMAGES
    for folder, name in (("img_emb_queries", "img_emb_{}.npy"), ("text_emb", "text_emb_{}.npy"), ("img_emb", "img_emb_{}.npy")):
        union = np.concatenate([np.load(tmp_path / "two" / folder / name.format(i)) for i in (0, 1)]).astype(np.float32)
        np.testing.assert_allclose(union, np.load(tmp_path / "one" / folder / name.format(0)).astype(np.float32), atol=2e-3)
    keys = [k for i in (0, 1) for k in pq.read_table(tmp_path / f"two/metadata/metadata_{i}.parquet").column("key").to_pylist()]
    assert keys == pq.read_table(tmp_path / "one/metadata/metadata_0.parquet").column("key").to_pylist()
    for target, corpus_index in (("image", indexes[0]), ("text", indexes[1])):
        out = tmp_path / f"index-{target}"
        assert build.main([f"embeddings={tmp_path / 'two'}", f"output_dir={out}", f"target={target}", "index_type=flat"]) == 0
        ours, reference = RetrievalIndex.load(out), RetrievalIndex.load(corpus_index)
        assert ours.manifest["checkpoint_id"] == reference.manifest["checkpoint_id"] and ours.manifest["count"] == reference.manifest["count"]
        assert ours.items(range(ours.manifest["count"])) == reference.items(range(reference.manifest["count"]))
        dim = ours.manifest["dim"]
        queries = np.random.default_rng(1).normal(size=(4, dim) if target == "image" else (4, 8, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
        for got, want in zip(ours.search(queries, 5), reference.search(queries, 5)):
            assert [h.item_id for h in got] == [h.item_id for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=3e-3)


def test_a_done_partition_is_skipped_and_a_missing_one_named(assets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "emb"
    assert embed.main([*embed_args(assets, out), "partition=1", "num_partitions=3"]) == 0
    stamp = (out / "img_emb_queries/img_emb_1.npy").stat().st_mtime_ns
    assert embed.main([*embed_args(assets, out), "partition=1", "num_partitions=3"]) == 0
    assert (out / "img_emb_queries/img_emb_1.npy").stat().st_mtime_ns == stamp  # not embedded again
    capsys.readouterr()
    assert build.main([f"embeddings={out}", f"output_dir={tmp_path / 'index'}"]) == 2
    assert "partitions [0, 2] of 3 are missing" in capsys.readouterr().err
    assert embed.main([*embed_args(assets, out), "partition=3", "num_partitions=3"]) == 2
    assert json.loads((out / "partitions/partition_1.json").read_text())["count"] == 8  # 24 images, a third
