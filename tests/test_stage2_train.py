"""The stage-2 program end to end on tiny synthetic shards, from a tiny stage-1 run to a tiny LLM: metrics,
checkpoints of the trainable part only, exact resume, T5, bad config; and the caption attribute metric."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from lavis_lite.checkpoint import latest_checkpoint
from stage2.evaluate import attribute_accuracy, named_objects
from stage2.train import main
from test_stage1_train import args_for, assets, final_weights, finish, launch  # noqa: F401 (assets: a fixture)
from tiny_llm import save_tiny_llm

ROOT = Path(__file__).resolve().parent.parent
TRAINABLE = ("ln_vision.", "query_tokens", "qformer.", "language_projection.")


@pytest.fixture(scope="module")
def stage1(assets):
    """A 2-step tiny stage-1 run on the shards; its run directory."""
    run_dir = assets[0] / "stage1-run"
    finish(launch(args_for(assets, run_dir, "train.steps=2", "train.save_every=2")))
    return run_dir


@pytest.fixture(scope="module")
def llms(assets):
    """Tiny random Llama and T5 directories, by kind."""
    return {kind: save_tiny_llm(kind, assets[0]) for kind in ("llama", "t5")}


def stage2_args(assets, stage1: Path, llm: Path, run_dir: Path, *extra: str) -> list[str]:
    root, _ = assets
    return [
        "--config", str(ROOT / "configs/stage2/tiny.yaml"), f"model.llm.path={llm}",
        f"model.stage1_checkpoint={stage1}", f"data.train_shards={root / 'data/train'}",
        f"data.val_shards={root / 'data/val'}", f"data.cache_dir={root / 'cache'}", f"train.output_dir={run_dir}",
        *extra,
    ]


def launch2(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "stage2.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def llama_run(assets, stage1, llms):
    """An uninterrupted 20-step stage-2 run with a tiny Llama; its run directory."""
    run_dir = assets[0] / "llama-run"
    finish(launch2(stage2_args(assets, stage1, llms["llama"], run_dir)))
    return run_dir


def test_llama_run_writes_metrics_trainable_checkpoints_and_curve(llama_run):
    metrics = json.loads((llama_run / "metrics.json").read_text())
    assert metrics["step"] == 20 and metrics["caption_images"] == 8
    for key in ("caption_attr_acc", "caption_attr_acc_no_image", "caption_colour_acc", "caption_shape_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert sorted(p.name for p in (llama_run / "checkpoints").glob("step-*")) == ["step-00000015", "step-00000020"]
    weights = final_weights(llama_run)
    assert "language_projection.weight" in weights and "query_tokens" in weights
    assert all(key.startswith(TRAINABLE) for key in weights), sorted(weights)
    assert (llama_run / "loss_curve.png").stat().st_size > 1000


def test_t5_run_trains_and_evaluates(assets, stage1, llms, tmp_path):
    finish(launch2(stage2_args(assets, stage1, llms["t5"], tmp_path / "t5", "train.steps=5")))
    metrics = json.loads((tmp_path / "t5" / "metrics.json").read_text())
    assert metrics["step"] == 5 and 0.0 <= metrics["caption_attr_acc"] <= 1.0
    assert all(key.startswith(TRAINABLE) for key in final_weights(tmp_path / "t5"))


def test_killed_run_resumes_to_the_same_weights(assets, stage1, llms, llama_run, tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = launch2(stage2_args(assets, stage1, llms["llama"], interrupted))
    deadline = time.time() + 300
    while latest_checkpoint(interrupted) is None:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = latest_checkpoint(interrupted)
    assert checkpoint.name < "step-00000020", "the kill came too late to test anything"
    out = finish(launch2(stage2_args(assets, stage1, llms["llama"], interrupted, "--resume")))
    assert f"resumed from {checkpoint}" in out
    expected, resumed = final_weights(llama_run), final_weights(interrupted)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    straight = json.loads((llama_run / "metrics.json").read_text())
    again = json.loads((interrupted / "metrics.json").read_text())
    for key in ("caption_loss", "caption_examples", "caption_attr_acc"):
        assert again[key] == straight[key], key


def test_config_errors_exit_2_naming_the_problem(assets, llms, tmp_path, capsys):
    assert main(stage2_args(assets, tmp_path, llms["llama"], tmp_path / "run", "eval.num_beamz=3")) == 2
    assert "unknown config key 'eval.num_beamz'" in capsys.readouterr().err
    assert main(stage2_args(assets, tmp_path / "no-stage1", llms["llama"], tmp_path / "run")) == 2
    missing = f"error: model.stage1_checkpoint={tmp_path / 'no-stage1'} does not exist: train stage 1 first"
    assert capsys.readouterr().err.startswith(missing)


def test_attribute_accuracy_needs_exactly_the_true_objects():
    truth = "a small red circle on the left and a large blue star on the right"
    assert named_objects(truth) == Counter({("red", "circle"): 1, ("blue", "star"): 1})
    assert named_objects("Two RED circles") == Counter({("red", "circle"): 1})  # plural and case
    generated = [
        "a blue star and a red circle",  # exact, in another order: a hit
        "a red circle",  # one object missing
        "a red circle, a blue star and a green square",  # one object too many
        "a red circle and a blue circle",  # a wrong shape
        "a blue circle and a red star",  # colours and shapes right, pairs wrong
    ]
    scores = attribute_accuracy(generated, [truth] * len(generated))
    assert scores == {"attr": 1 / 5, "colour": 3 / 5, "shape": 2 / 5}
    two_circles = "a small red circle above a large red circle"
    pair = attribute_accuracy(["a red circle", "a red circle below a red circle"], [two_circles] * 2)
    assert pair == {"attr": 0.5, "colour": 0.5, "shape": 0.5}  # a multiset: one red circle is not two
    with pytest.raises(ValueError, match="2 generated captions for 1 images"):
        attribute_accuracy(["a", "b"], ["c"])
