"""kill -9 at every file-system step of a checkpoint write and of an index build and swap: the run resumes to the
uninterrupted result, no checkpoint of an earlier run is lost, and readers always find a whole index.

One driver process (`DRIVER`) forks a child per attempt; in the child every file-system call that writes,
renames or deletes (os.replace/rename/unlink/rmdir/mkdir/chmod/fsync, tempfile.mkstemp/mkdtemp,
shutil.rmtree, renameat2, and the writers of weights, training state and config) counts, and the child
SIGKILLs itself before call N. A first run counts the calls; then N goes over all of them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r'''
import filecmp, json, os, shutil, signal, sys, tempfile, traceback
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

import lavis_lite.checkpoint as checkpoint_module
import lavis_lite.io as io_module
from lavis_lite.training import train_loop
from lavis_lite.training.train_config import OptimConfig, TrainConfig


STATE = {"armed": False, "calls": 0, "crash_at": None}


def counted(fn):
    def call(*args, **kwargs):
        if STATE["armed"]:
            STATE["calls"] += 1
            if STATE["calls"] == STATE["crash_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return call


for owner, name in [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "chmod"),
                    (os, "fsync"), (tempfile, "mkstemp"), (tempfile, "mkdtemp"), (shutil, "rmtree"),
                    (io_module, "_exchange"), (checkpoint_module, "save_file"), (torch, "save"), (Path, "write_text"),
                    (np, "save")]:
    setattr(owner, name, counted(getattr(owner, name)))


def armed(fn):
    def call(*args, **kwargs):
        STATE["armed"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            STATE["armed"] = False
    return call


def attempt(work, crash_at=None):
    """Run `work()` in a child; 'killed', 'ok' or 'failed', and the number of counted calls it made."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        STATE["calls"], STATE["crash_at"] = 0, crash_at
        try:
            work()
            os.write(write, str(STATE["calls"]).encode())
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    calls = int(os.read(read, 64) or b"-1")
    os.close(read)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", calls
    return ("ok" if os.WEXITSTATUS(status) == 0 else "failed"), calls


# ---- training -------------------------------------------------------------------------------------------
X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0])


def batches(start):
    n = start
    while True:
        rows = torch.arange(n * 8, (n + 1) * 8) % len(X)
        yield {"x": X[rows], "y": Y[rows]}
        n += 1


def mse(model, batch):
    return {"loss": (model(batch["x"]).squeeze(-1) - batch["y"]).square().mean()}


def train(run_dir, steps, resume, keep=2):
    def work():
        torch.manual_seed(0)
        cfg = TrainConfig(output_dir=str(run_dir), steps=steps, precision="no", log_every=2, save_every=2,
                          eval_every=0, keep_checkpoints=keep,
                          optim=OptimConfig(lr=0.05, min_lr=0.005, warmup_steps=2, grad_clip=None))
        train_loop.train(cfg, nn.Linear(4, 1), mse, batches, resume=resume)
    return work


train_loop._Run.checkpoint = armed(train_loop._Run.checkpoint)


def final(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def check_training(tmp):
    earlier = tmp / "earlier"  # the earlier run: steps 1-4, checkpoints 2 and 4
    assert attempt(train(earlier, 4, False))[0] == "ok"
    reference = tmp / "reference"
    shutil.copytree(earlier, reference)
    status, total = attempt(train(reference, 8, True, keep=1))  # writes 6, then 8 and deletes 6
    assert status == "ok" and total > 20, (status, total)
    for n in range(1, total + 1):
        run = tmp / f"crash-{n}"
        shutil.copytree(earlier, run)
        status, _ = attempt(train(run, 8, True, keep=1), crash_at=n)
        assert status == "killed", (n, status)
        for step in ("step-00000002", "step-00000004"):
            for name in ("model.safetensors", "training_state.pt", "config.yaml"):
                assert filecmp.cmp(earlier / "checkpoints" / step / name, run / "checkpoints" / step / name, shallow=False), (n, step, name)
        assert attempt(train(run, 8, True, keep=1))[0] == "ok", n
        assert all(torch.equal(a, b) for a, b in zip(final(reference).values(), final(run).values())), n
        assert losses(run) == losses(reference), n
        left = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert all(name == "latest" or name.startswith("step-") for name in left), (n, left)  # no half-written or half-deleted copies
        for step in (run / "checkpoints").glob("step-*"):
            assert sorted(p.name for p in step.iterdir()) == ["config.yaml", "model.safetensors", "training_state.pt"], (n, step)
        shutil.rmtree(run)
    return total


# ---- index ----------------------------------------------------------------------------------------------
from retrieval.index import IndexWriter, RetrievalIndex, build_index


def vectors(seed):
    v = np.random.default_rng(seed).standard_normal((60, 4, 8)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def build(out, seed):
    def work():
        writer = IndexWriter(out, dim=8, vectors_per_item=4, index_type="flat", manifest={"version": seed})
        v = vectors(seed)
        for chunk in range(2):
            rows = range(chunk * 30, (chunk + 1) * 30)
            writer.write_chunk(chunk, v[rows.start : rows.stop], [{"key": f"{seed}-{i}"} for i in rows])
        writer.finalize()
    return work


IndexWriter.write_chunk = armed(IndexWriter.write_chunk)
IndexWriter.finalize = armed(IndexWriter.finalize)


def hits(path):
    index = RetrievalIndex.load(path)
    found = index.search(vectors(7)[:3], k=5)
    return index.manifest["version"], [[(index.items([h.item_id])[0]["key"], round(h.score, 5)) for h in row] for row in found]


def check_index(tmp):
    reference = tmp / "reference-index"
    assert attempt(build(reference, 2))[0] == "ok"
    new_hits = hits(reference)
    base = tmp / "base"
    assert attempt(build(base / "index", 1))[0] == "ok"
    old_hits = hits(base / "index")
    status, total = attempt(build(base / "copy", 2))
    assert status == "ok" and total > 10, (status, total)
    for n in range(1, total + 1):
        parent = tmp / f"index-crash-{n}"
        shutil.copytree(base / "index", parent / "index")
        status, _ = attempt(build(parent / "index", 2), crash_at=n)
        assert status == "killed", (n, status)
        assert hits(parent / "index") in (old_hits, new_hits), n  # a reader finds the old index or the new one
        assert attempt(build(parent / "index", 2))[0] == "ok", n
        assert hits(parent / "index") == new_hits, n
        assert sorted(p.name for p in parent.iterdir()) == ["index"], (n, sorted(p.name for p in parent.iterdir()))
        shutil.rmtree(parent)
    return total


tmp = Path(sys.argv[1])
train(tmp / "warm-up", 2, False)()  # lazy imports and caches (accelerate, matplotlib), once before the forks
print(json.dumps({"checkpoint_steps": check_training(tmp), "index_steps": check_index(tmp)}))
'''


def test_kill_at_every_checkpoint_write_and_index_swap_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["checkpoint_steps"] > 20 and counts["index_steps"] > 10, counts
