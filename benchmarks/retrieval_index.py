"""Retrieval index benchmark: build time, search latency, throughput and recall@10 per index type.

    python benchmarks/retrieval_index.py --images 20000        # quick (a few minutes): the default types
    # 100k images (3.2M vectors), every type (run under nice; ~35 min on 2 cores):
    python benchmarks/retrieval_index.py --images 100000 --queries 500 --recall-queries 200 --latency-queries 20 \
        --types flat ivf:nlist=2048 ivfpq:nlist=2048,rescore=64 hnsw:hnsw_m=16,ef_construction=40 \
        mean-flat mean-hnsw mean-ivf --nprobe 16 64 --ef-search 128 512 --rescore 0 64 256 --json runs/index-100k.json
    # 1M images (32M vectors; approximate types only; 16 GB of --cache and 16 GB per rescoring index on disk):
    python benchmarks/retrieval_index.py --images 1000000 --queries 200 --recall-queries 100 --latency-queries 10 \
        --cache runs/bench-cache-1m --types mean-flat mean-ivf mean-hnsw:hnsw_m=16,ef_construction=40 \
        ivfpq:pq_bytes=16,nlist=256,rescore=64 --nprobe 16 64 --rescore 0 256 1024 --json runs/index-1m.json

Features are synthetic BLIP-2 image features, 32 L2-normalised vectors of 256 per image, with structure:
``--clusters`` concept centres uniform on the sphere; each image's centre is a concept centre plus an
independent random unit direction (cosine ~0.7 to its concept, ~0.5 between images of one
concept); each of its 32 vectors is the image centre plus another such direction (cosine ~0.5 between
vectors of one image). Chunk c of ``--chunk`` images is drawn from ``default_rng([seed, c])``, so chunks are
regenerated whenever needed (or read back from ``--cache``) and the corpus is never held in RAM (1M images
are 32 GB as float32).
Text queries are one vector of a random image (from 4 random chunks) plus a random unit direction
(cosine ~0.7 to it);
``--query-vectors V`` makes image-style queries of V such vectors of one image instead.

Recall@10 is measured against an exact chunked scan (max over vectors, numpy) of ``--recall-queries``
queries; queries/s is one batched call over ``--queries``; ms/query is the mean of single-query calls. Next to
each, the process's CPU time per query (all threads): on a shared machine it varies less than wall time.
Every index is built through ``retrieval.index.build_index`` from the regenerated chunks (the path
``IndexWriter.finalize`` takes) in ``--work`` and deleted after its rows unless ``--keep``.
Type specs: ``flat``, ``ivf``, ``ivfpq``, ``pqfs``, ``hnsw``, ``mean-<type>`` (first_stage=mean) and
options as ``spec:key=value,...`` (index_options keys), e.g. ``mean-pqfs:rescore_codes=sq6,exact_rescore=32``.
Each ``--nprobe`` / ``--ef-search`` / ``--rescore`` / ``--exact-rescore`` value (where it applies) gives a row.

RSS MB is the index's resident memory: a fresh process's growth from before ``RetrievalIndex.load`` to after
the single-query calls. ``vectors.f16.npy`` stays on disk (read with ``pread``, so its pages are the page
cache's, not the process's): "cold ms/q" times the same single queries with that file evicted from the page
cache before each one, so every read it makes comes from the disk.
For ``flat`` rows the machine's bounds, measured in the same run, come with them: the batched call's
GFLOP/s against a float32 matmul of the same shape class (``--peak`` GFLOP/s, numpy/BLAS), and the single
query's time against the time to read the index's vectors once at the measured memory bandwidth.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lavis_lite.retrieval.index import VECTORS_FILE, RetrievalIndex, build_index

DIM, VECTORS = 256, 32
DEFAULT_TYPES = ["flat", "ivf", "ivfpq", "ivfpq:rescore=64", "hnsw:hnsw_m=16,ef_construction=40", "mean-flat", "mean-hnsw"]


def normalised(x: np.ndarray) -> np.ndarray:
    x /= np.sqrt(np.einsum("...d,...d->...", x, x))[..., None]
    return x


def unit_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random unit directions from random bytes (uniform per coordinate; near-isotropic in 256-d and 2x
    faster to draw than normal variates, which dominated generating 1M images)."""
    return normalised(np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.int8).reshape(shape).astype(np.float32))


class SyntheticImages:
    """A ``ChunkSource`` of structured image features, regenerated per chunk from (seed, chunk id), rounded
    to float16 (the values every index and the exact scan see), optionally cached as float16 files."""

    def __init__(self, images: int, chunk: int, clusters: int, seed: int, cache: Path | None = None):
        self.sizes = [min(chunk, images - start) for start in range(0, images, chunk)]
        self.chunk, self.seed, self.cache = chunk, seed, cache
        self.centres = unit_noise(np.random.default_rng(seed), (clusters, DIM))
        if cache:
            cache.mkdir(parents=True, exist_ok=True)

    def vectors(self, chunk: int) -> np.ndarray:
        path = self.cache / f"{self.seed}-{chunk}-{self.sizes[chunk]}-{len(self.centres)}.npy" if self.cache else None
        if path and path.exists():
            return np.load(path).astype(np.float32)
        rng = np.random.default_rng([self.seed, chunk])
        n = self.sizes[chunk]
        image_centres = normalised(self.centres[rng.integers(len(self.centres), size=n)] + unit_noise(rng, (n, DIM)))
        vectors = normalised(image_centres[:, None, :] + unit_noise(rng, (n, VECTORS, DIM))).astype(np.float16)
        if path:
            np.save(path, vectors)
        return vectors.astype(np.float32)

    def items(self, chunk: int) -> list[dict]:
        start = chunk * self.chunk
        return [{"key": f"img{start + i:07d}"} for i in range(self.sizes[chunk])]


def make_queries(corpus: SyntheticImages, count: int, query_vectors: int, seed: int, chunks: int = 4) -> np.ndarray:
    """[count, dim] (text-style) or [count, query_vectors, dim] queries near random images' vectors. The
    images come from ``chunks`` random chunks (all chunks are drawn alike), so only those are regenerated."""
    rng = np.random.default_rng(seed)
    picked_chunks = rng.choice(len(corpus.sizes), size=min(chunks, len(corpus.sizes)), replace=False)
    chunk_of_query = picked_chunks[rng.integers(len(picked_chunks), size=count)]
    images = chunk_of_query * corpus.chunk + rng.integers(np.asarray(corpus.sizes)[chunk_of_query])
    picked = np.stack([rng.choice(VECTORS, size=query_vectors, replace=False) for _ in range(count)])
    queries = np.empty((count, query_vectors, DIM), np.float32)
    for chunk in np.unique(images // corpus.chunk):
        rows = np.flatnonzero(images // corpus.chunk == chunk)
        vectors = corpus.vectors(int(chunk))
        queries[rows] = vectors[images[rows] % corpus.chunk][np.arange(len(rows))[:, None], picked[rows]]
    queries = normalised(queries + unit_noise(rng, queries.shape))
    return queries[:, 0] if query_vectors == 1 else queries


def exact_top_k(corpus: SyntheticImages, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k image ids per query by max over vectors, scanning the regenerated chunks."""
    flat_queries = queries.reshape(len(queries), -1, DIM)
    nq, query_vectors, _ = flat_queries.shape
    best_ids = np.full((nq, 0), -1, np.int64)
    best_scores = np.full((nq, 0), -np.inf, np.float32)
    start = 0
    for chunk, size in enumerate(corpus.sizes):
        vectors = corpus.vectors(chunk).reshape(-1, DIM)
        scores = (vectors @ flat_queries.reshape(-1, DIM).T).reshape(size, VECTORS, nq, query_vectors).max(axis=(1, 3)).T
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + size), (nq, size))], axis=1)
        scores = np.concatenate([best_scores, scores], axis=1)
        order = np.stack([np.lexsort((row_ids, -row)) for row_ids, row in zip(ids, scores)])[:, :k]
        best_ids, best_scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        start += size
    return best_ids


def parse_spec(spec: str) -> tuple[str, dict]:
    """``mean-ivf:rescore=128,nlist=2048`` -> ("ivf", {"first_stage": "mean", "rescore": 128, "nlist": 2048})."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    if name.startswith("mean-"):
        name, options["first_stage"] = name[len("mean-") :], "mean"
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, options


def search_settings(index_type: str, options: dict, args: argparse.Namespace) -> list[dict]:
    """One dict of search() keyword arguments per row: the product of the sweeps that apply."""
    rescores = [r for r in args.rescore if r > 0 or options["first_stage"] != "mean"]  # mean needs rescoring
    sweeps = [("nprobe", args.nprobe, index_type in ("ivf", "ivfpq")), ("ef_search", args.ef_search, index_type == "hnsw"),
              ("rescore", rescores, options["rescore"] > 0),
              ("exact_rescore", args.exact_rescore, options.get("rescore_codes", "f16") != "f16")]  # fmt: skip
    settings: list[dict] = [{}]
    for key, values, applies in sweeps:
        if applies and values:
            settings = [{**setting, key: value} for setting in settings for value in values]
    return settings


def timed(search, *arguments) -> tuple[float, float, list]:
    """Wall and CPU seconds (all threads) of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = search(*arguments)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (the next read comes from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.name in ("index.faiss", VECTORS_FILE)) / 2**20


RESIDENT_PROBE = """
import sys, numpy as np
from lavis_lite.retrieval.index import RetrievalIndex
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024
before = rss()
index = RetrievalIndex.load(sys.argv[1], use_gpu=False)
for query in np.load(sys.argv[2]):
    index.search(query[None], 10)
print(rss() - before)
"""


def resident_mb(path: Path, queries: np.ndarray, work: Path) -> float:
    """Resident memory (MB) of the index at ``path`` in a fresh process, after loading it and answering
    ``queries`` one by one with its default search settings."""
    queries_file = work / "resident-queries.npy"
    np.save(queries_file, queries)
    out = subprocess.run([sys.executable, "-c", RESIDENT_PROBE, str(path), str(queries_file)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout.split()[-1])


def machine_bounds(seconds: float = 2.0) -> tuple[float, float]:
    """(float32 matmul GFLOP/s, memory read GB/s) of this machine with the threads numpy/BLAS uses: a
    [1024 x 256] x [256 x 65536] product (the batched flat search's shape class) and a matrix-vector product
    over a 1 GiB matrix (the single query's access pattern), best of repeated calls."""
    rng = np.random.default_rng(0)
    queries, vectors = rng.standard_normal((1024, 256), dtype=np.float32), rng.standard_normal((65536, 256), dtype=np.float32)
    matrix, vector = rng.standard_normal((2**20, 256), dtype=np.float32), rng.standard_normal(256, dtype=np.float32)
    best_mm = best_mv = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        queries @ vectors.T
        best_mm = min(best_mm, time.perf_counter() - start)
        start = time.perf_counter()
        matrix @ vector
        best_mv = min(best_mv, time.perf_counter() - start)
    return 2 * queries.size * len(vectors) / best_mm / 1e9, matrix.nbytes / best_mv / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="corpus size (images of 32 x 256 vectors)")
    parser.add_argument("--chunk", type=int, default=10000, help="images per generated chunk")
    parser.add_argument("--clusters", type=int, default=None, help="concept centres (default images / 100)")
    parser.add_argument("--types", nargs="+", default=DEFAULT_TYPES, help="index specs, see the module docstring")
    parser.add_argument("--queries", type=int, default=1000, help="queries in the batched throughput call")
    parser.add_argument("--recall-queries", type=int, default=200, help="queries with exact ground truth")
    parser.add_argument("--latency-queries", type=int, default=30, help="single-query calls timed")
    parser.add_argument("--query-vectors", type=int, default=1, help="vectors per query (1: text -> image)")
    parser.add_argument("--nprobe", type=int, nargs="*", default=[], help="IVF nprobe values (default: the index's)")
    parser.add_argument("--ef-search", type=int, nargs="*", default=[], help="HNSW efSearch values")
    parser.add_argument("--rescore", type=int, nargs="*", default=[], help="re-scored candidates (rescoring indexes; 0 = none)")
    parser.add_argument("--exact-rescore", type=int, nargs="*", default=[], help="items re-ranked exactly after sq codes")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-retrieval-index", help="where indexes are built")
    parser.add_argument("--keep", action="store_true", help="keep the built indexes")
    parser.add_argument("--cache", help="keep generated chunks here as float16 (16 GB per 1M images): each later "
                        "pass reads them instead of regenerating (2.5 s of CPU per 10k images); the exact top-k too")  # fmt: skip
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)

    cache = Path(args.cache) if args.cache else None
    corpus = SyntheticImages(args.images, args.chunk, args.clusters or max(10, args.images // 100), args.seed, cache)
    queries = make_queries(corpus, max(args.queries, args.recall_queries), args.query_vectors, args.seed + 1)
    start = time.perf_counter()
    exact_file = cache / f"exact-{args.seed}-{args.images}-{len(corpus.centres)}-{args.query_vectors}-{args.recall_queries}-{args.k}.npy" if cache else None
    if exact_file and exact_file.exists():
        exact = np.load(exact_file)
    else:
        exact = exact_top_k(corpus, queries[: args.recall_queries], args.k)
        if exact_file:
            np.save(exact_file, exact)
    print(f"{args.images} images x {VECTORS} x {DIM}; exact scan of {args.recall_queries} queries: {time.perf_counter() - start:.1f} s", flush=True)

    peak_gflops, bandwidth_gbs = machine_bounds()
    print(f"machine: float32 matmul {peak_gflops:.0f} GFLOP/s, memory read {bandwidth_gbs:.1f} GB/s ({os.cpu_count()} CPUs)", flush=True)
    rows = []
    header = (f"{'index':<36} {'build s':>8} {'MB':>7} {'RSS MB':>7} {'search':>26} {'ms/query':>9} {'cold ms/q':>9} {'cpu ms/q':>9} "
              f"{'queries/s':>10} {'cpu ms/q':>9} {'recall@10':>9}")  # fmt: skip
    print(header, flush=True)
    for spec in args.types:
        index_type, options = parse_spec(spec)
        out = Path(args.work) / spec.replace(":", "_").replace(",", "_").replace("=", "")
        build_s, _, _ = timed(lambda: build_index(out, corpus, dim=DIM, vectors_per_item=VECTORS, index_type=index_type, index_options=options))
        rss_mb = resident_mb(out, queries[: args.latency_queries], Path(args.work))
        index = RetrievalIndex.load(out, use_gpu=False)
        for setting in search_settings(index_type, index.options, args):
            index.search(queries[:1], args.k, **setting)  # warm-up
            single = [timed(lambda q=query: index.search(q[None], args.k, **setting)) for query in queries[: args.latency_queries]]
            latency_ms, latency_cpu_ms = (1000 * np.mean([t[i] for t in single]) for i in (0, 1))
            cold_ms = float("nan")
            if (out / VECTORS_FILE).exists() and setting.get("rescore", index.options["rescore"]) and \
                    (index.rescore_codes == "f16" or setting.get("exact_rescore", index.options.get("exact_rescore"))):  # fmt: skip
                cold = []
                for query in queries[: args.latency_queries]:
                    evict(out / VECTORS_FILE)
                    cold.append(timed(lambda q=query: index.search(q[None], args.k, **setting))[0])
                cold_ms = 1000 * float(np.mean(cold))
            batch_s, batch_cpu_s, hits = timed(lambda: index.search(queries[: args.queries], args.k, **setting))
            recall = np.mean([len({h.item_id for h in row} & set(ids)) / args.k for row, ids in zip(hits, exact)])
            label = ",".join(f"{key}={value}" for key, value in setting.items()) or "default"
            row = {"index": spec, "build_s": build_s, "mb": directory_mb(out), "rss_mb": rss_mb, "search": label,
                   "ms_per_query": latency_ms, "cold_ms_per_query": cold_ms, "cpu_ms_per_query": latency_cpu_ms,
                   "queries_per_s": args.queries / batch_s, "batched_cpu_ms_per_query": 1000 * batch_cpu_s / args.queries,
                   "recall_at_10": float(recall), "options": index.options}  # fmt: skip
            rows.append(row)
            print(f"{spec:<36} {build_s:8.1f} {row['mb']:7.0f} {rss_mb:7.0f} {label:>26} {latency_ms:9.2f} {cold_ms:9.2f} {latency_cpu_ms:9.2f} "
                  f"{row['queries_per_s']:10.1f} {row['batched_cpu_ms_per_query']:9.2f} {recall:9.3f}", flush=True)  # fmt: skip
            if index_type == "flat" and index.options["first_stage"] == "all":
                gflops = row["queries_per_s"] * args.images * VECTORS * DIM * 2 / 1e9
                bound_ms = 1000 * args.images * VECTORS * DIM * 4 / (bandwidth_gbs * 1e9)
                row.update(gflops=gflops, peak_gflops=peak_gflops, bandwidth_bound_ms=bound_ms)
                print(f"    exact: batched {gflops:.0f} GFLOP/s = peak / {peak_gflops / gflops:.2f}; "
                      f"single query {latency_ms:.1f} ms = bandwidth bound ({bound_ms:.1f} ms) x {latency_ms / bound_ms:.2f}", flush=True)
        del index
        if not args.keep:
            shutil.rmtree(out)
    if args.json:
        os.makedirs(Path(args.json).parent, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "matmul_gflops": peak_gflops, "bandwidth_gbs": bandwidth_gbs}
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
