"""Load on `lavis-lite serve` over loopback: throughput, latency percentiles, errors and the server's memory at
1, 4, 16 and 64 concurrent clients, with and without micro-batching, on the demo index and on a synthetic
100k-image index (the demo model's shapes, random vectors).

    python benchmarks/serve.py --checkpoint runs/stage1-demo --work runs/bench-serve

Each client is a thread sending clip-retrieval `/knn-service` text queries back to back (`--duration` seconds
or `--requests` per client, whichever ends first); the server is a `lavis-lite serve` subprocess. Clients and
server share the machine's cores, so the figures are a lower bound of what the server does alone. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
from lavis_lite.retrieval.index import IndexWriter

QUERIES = ["a red circle", "a large blue square on the left", "a small yellow star above a large green triangle",
           "a green cross", "two purple hearts", "an orange triangle at the bottom", "a small white circle"]


def demo_index(checkpoint: str, work: Path) -> Path:
    out = work / "demo-index"
    if not (out / "manifest.json").is_file():
        from lavis_lite.retrieval import build

        args = [f"checkpoint={checkpoint}", f"corpus.path={ROOT / 'data/synthetic/val'}", f"output_dir={out}", "resume=false"]
        assert build.main(["--config", "retrieval/demo", *args]) == 0
    return out


def synthetic_index(like: Path, images: int, work: Path, index_type: str) -> Path:
    """`images` items of random unit vectors in the demo index's shapes, under its manifest's model."""
    out = work / f"synthetic-{images}-{index_type}"
    if (out / "manifest.json").is_file():
        return out
    manifest = json.loads((like / "manifest.json").read_text())
    keep = ("checkpoint_id", "source", "embed_dim", "num_queries", "image_size", "target", "corpus")
    writer = IndexWriter(out, dim=manifest["dim"], vectors_per_item=manifest["vectors_per_item"], index_type=index_type,
                         manifest={k: manifest[k] for k in keep}, resume=False)
    chunk = 10_000
    for c, start in enumerate(range(0, images, chunk)):
        n = min(chunk, images - start)
        v = np.random.default_rng([0, c]).standard_normal((n, manifest["vectors_per_item"], manifest["dim"]), dtype=np.float32)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        items = [{"key": f"synthetic-{start + i}", "locator": {"path": "/nonexistent.jpg"}, "captions": ["synthetic"]} for i in range(n)]
        writer.write_chunk(c, v, items)
    return writer.finalize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(index: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.Popen([sys.executable, "-m", "lavis_lite.cli", "serve", "--index", f"bench={index}", "--port", str(port),
                             "--max-batch", str(max_batch), "--device", "cpu"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if requests.get(url + "readyz", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def load(url: str, clients: int, duration: float, per_client: int, k: int) -> dict:
    latencies, errors = [], 0

    def client(seed: int) -> tuple[list[float], int]:
        session, own, bad = requests.Session(), [], 0
        end = time.perf_counter() + duration
        for i in range(per_client):
            if time.perf_counter() > end:
                break
            body = {"text": QUERIES[(seed + i) % len(QUERIES)], "indice_name": "bench", "num_images": k, "modality": "image"}
            start = time.perf_counter()
            response = session.post(url + "knn-service", json=body, timeout=60)
            own.append(time.perf_counter() - start)
            bad += response.status_code != 200
        return own, bad

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for own, bad in pool.map(client, range(clients)):
            latencies += own
            errors += bad
    wall = time.perf_counter() - started
    ms = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {"clients": clients, "requests": len(latencies), "qps": len(latencies) / wall, "p50_ms": ms[0],
            "p95_ms": ms[1], "p99_ms": ms[2], "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/stage1-demo", help="the stage-1 run the demo index is built with")
    parser.add_argument("--work", default="runs/bench-serve", help="where the indexes are built (kept for reruns)")
    parser.add_argument("--synthetic", type=int, default=100_000, help="images in the synthetic index (0: none)")
    parser.add_argument("--synthetic-types", nargs="+", default=["flat", "ivf"], help="index types of the synthetic index")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per client count")
    parser.add_argument("--requests", type=int, default=400, help="requests per client at most")
    parser.add_argument("-k", type=int, default=10, help="num_images per query")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch / faiss threads")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    indexes = {"demo (1k images)": demo_index(args.checkpoint, work)}
    for index_type in args.synthetic_types if args.synthetic else []:
        indexes[f"synthetic ({args.synthetic // 1000}k images), {index_type}"] = synthetic_index(indexes["demo (1k images)"], args.synthetic, work, index_type)
    rows = []
    for name, index in indexes.items():
        manifest = json.loads((index / "manifest.json").read_text())
        for max_batch in (16, 1):
            proc, url = start_server(index, max_batch, args.threads)
            try:
                before = rss_mb(proc.pid)
                for clients in args.clients:
                    row = load(url, clients, args.duration, args.requests, args.k)
                    row.update(index=name, index_type=manifest["index_type"], micro_batching=max_batch > 1,
                               rss_before_mb=before, rss_after_mb=rss_mb(proc.pid))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print("\n| index (type) | micro-batching | clients | queries/s | p50 ms | p95 ms | p99 ms | errors | server RSS MB (start -> end) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['index']} ({r['index_type']}) | {'on' if r['micro_batching'] else 'off'} | {r['clients']} | {r['qps']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
