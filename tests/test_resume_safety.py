"""Resuming is safe: a training state cannot run code, and no run loses a checkpoint it did not write.

On the toy model of tests/test_train_loop.py (save_every=3, keep_checkpoints=2)."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from lavis_lite.checkpoint import STATE, latest_checkpoint, load_training_state
from lavis_lite.config import ConfigError
from lavis_lite.training.train_loop import train
from test_train_loop import batches, config, mse, toy_model


class Planted:
    """A pickle that, when loaded by an unsafe reader, writes a file (it could run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def run(tmp_path, steps=9, keep=2, **kwargs):
    model = toy_model()
    cfg = config(tmp_path, steps=steps, save_every=3, keep_checkpoints=keep)
    return train(cfg, model, mse, batches(8), **kwargs), model


def test_a_planted_training_state_does_not_run(tmp_path):
    run(tmp_path / "run", steps=6)
    newest = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    with open(newest / STATE, "wb") as f:
        pickle.dump({"step": 6, "optimizer": Planted(marker), "scheduler": {}, "rng": []}, f)
    with pytest.raises(ConfigError, match="is not a training state lavis_lite wrote"):
        load_training_state(newest)
    with pytest.raises(ConfigError, match="is not a training state lavis_lite wrote"):
        run(tmp_path / "run", steps=9, resume=True)
    assert not marker.exists()


def test_garbage_training_state_is_named(tmp_path):
    run(tmp_path / "run", steps=3)
    newest = latest_checkpoint(tmp_path / "run")
    (newest / STATE).write_bytes(b"\x00not a torch file")
    with pytest.raises(ConfigError, match=f"{newest / STATE} is not a training state"):
        load_training_state(newest)


def test_resume_after_deleting_the_newest_goes_on_from_the_next_newest(tmp_path):
    straight = toy_model()
    train(config(tmp_path / "straight", steps=9, save_every=3), straight, mse, batches(8))
    run(tmp_path / "run", steps=9, keep=3)  # writes steps 3, 6 and 9
    for newest in checkpoints(tmp_path / "run")[1:]:  # rolled back to step 3: `latest` still names step 9
        for f in newest.iterdir():
            f.unlink()
        newest.rmdir()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    result, resumed = run(tmp_path / "run", steps=9, resume=True)
    assert result.step == 9
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-00000003", "step-00000006", "step-00000009"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 9]  # the history after step 3 is the resumed run's, once
    for a, b in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--resume: .* holds no complete checkpoint"):
        run(tmp_path / "empty", steps=3, resume=True)
    assert not (tmp_path / "empty" / "checkpoints").exists()


def test_a_rerun_into_a_run_directory_is_refused_unless_asked(tmp_path):
    run(tmp_path / "run", steps=6)
    before = sorted(p.name for p in checkpoints(tmp_path / "run"))
    history = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run .*--resume.*--overwrite"):
        run(tmp_path / "run", steps=6)
    assert sorted(p.name for p in checkpoints(tmp_path / "run")) == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == history
    run(tmp_path / "run", steps=3, overwrite=True)
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-00000003"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]


def test_a_run_prunes_only_its_own_checkpoints(tmp_path):
    run(tmp_path / "run", steps=3)  # the earlier run: step 3
    run(tmp_path / "run", steps=12, resume=True)  # this run writes 6, 9, 12 and keeps its newest two
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-00000003", "step-00000009", "step-00000012"]


def test_resume_and_overwrite_go_anywhere_on_the_command_line():
    from stage1.train import build_parser

    args = build_parser().parse_intermixed_args(["train.steps=5", "--resume", "train.seed=1"])
    assert args.resume and not args.overwrite and args.overrides == ["train.steps=5", "train.seed=1"]
    args = build_parser().parse_intermixed_args(["--overwrite", "train.steps=5"])
    assert args.overwrite and args.overrides == ["train.steps=5"]


def test_leftovers_of_an_interrupted_checkpoint_write_are_removed_on_the_next_run(tmp_path):
    run(tmp_path / "run", steps=6)
    root = tmp_path / "run" / "checkpoints"
    staging = root / ".step-00000009.k3j2.tmp"  # a save killed while writing step 9
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    (root / ".latest.x1y2.tmp").write_text("step-000")
    result, _ = run(tmp_path / "run", steps=9, resume=True)
    assert result.step == 9
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003", "step-00000006", "step-00000009"]
