"""The stage-1 program end to end on tiny synthetic shards: metrics, exact resume, two processes, bad config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from lavis_lite.demo.synthetic import COLOURS, SHAPES, generate
from conftest import BERT_SPECIAL, save_bert_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["a", "an", "and", "the", "on", "of", "in", "to", "left", "right", "above", "below", "top", "bottom",
         "corner", "center", "small", "large", "there", "is", "image", "picture", "with", *COLOURS, *SHAPES]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    generate(root / "data", train=96, val=32, image_size=32, seed=0, shard_size=48, progress=False)
    bert = root / "bert"
    bert.mkdir()
    save_bert_tokenizer(bert, dict.fromkeys(WORDS))
    vocab = [*BERT_SPECIAL, *dict.fromkeys(WORDS)]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(bert)
    return root, len(vocab) + 1


def args_for(assets, run_dir: Path, *extra: str) -> list[str]:
    root, vocab_size = assets
    return [
        "--config", str(ROOT / "configs/stage1/tiny.yaml"),
        f"model.qformer.bert={root / 'bert'}", f"model.qformer.vocab_size={vocab_size}",
        f"data.train_shards={root / 'data/train'}", f"data.val_shards={root / 'data/val'}",
        f"data.cache_dir={root / 'cache'}", f"train.output_dir={run_dir}", *extra,
    ]


def launch(args: list[str], nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m"] if nproc == 1 else [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    return subprocess.Popen([*prefix, "stage1.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def final_weights(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_run_writes_metrics_and_curve(assets, tmp_path):
    finish(launch(args_for(assets, tmp_path / "run")))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["step"] == 40 and metrics["count"] == 32
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(5, 41, 5))
    assert all(k in history[0] for k in ("itc", "itm", "itg"))


def test_killed_run_resumes_to_the_same_weights(assets, tmp_path):
    finish(launch(args_for(assets, tmp_path / "straight")))
    interrupted = tmp_path / "interrupted"
    proc = launch(args_for(assets, interrupted))
    deadline = time.time() + 300
    while not (interrupted / "checkpoints" / "step-00000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = (interrupted / "checkpoints" / "latest").read_text().strip()
    assert latest < "step-00000040", "the kill came too late to test anything"
    out = finish(launch(args_for(assets, interrupted, "--resume")))
    assert f"resumed from {interrupted / 'checkpoints' / latest}" in out
    expected, resumed = final_weights(tmp_path / "straight"), final_weights(interrupted)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert json.loads((interrupted / "metrics.json").read_text())["t2i_r1"] == straight["t2i_r1"]


def test_two_processes_train(assets, tmp_path):
    out = finish(launch(args_for(assets, tmp_path / "ddp", "train.steps=6", "train.save_every=3", "train.eval_every=0"), nproc=2))
    assert "2 process(es)" in out
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["step"] == 6


def test_unknown_key_is_rejected_by_name(assets, tmp_path):
    proc = launch(args_for(assets, tmp_path / "bad", "train.stepz=5"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.stepz'" in out and "did you mean 'train.steps'" in out
