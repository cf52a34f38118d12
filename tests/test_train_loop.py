"""The shared training loop on a toy model: gradient accumulation, the non-finite guard, schedule, weight decay."""

import json
import math
import sys

import pytest
import torch
from torch import nn

from lavis_lite.config import ConfigError
from lavis_lite.evaluation.retrieval_metrics import rerank_top_k, retrieval_recall
from lavis_lite.training.train_config import OptimConfig, TrainConfig
from lavis_lite.training.train_loop import param_groups, train, warmup_cosine

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def batches(batch_size: int):
    def source(start: int):
        n = start
        while True:
            rows = torch.arange(n * batch_size, (n + 1) * batch_size) % len(X)
            yield {"x": X[rows], "y": Y[rows]}
            n += 1

    return source


def mse(model, batch):
    return {"loss": (model(batch["x"]).squeeze(-1) - batch["y"]).square().mean()}


def config(tmp_path, **kwargs) -> TrainConfig:
    base = dict(output_dir=str(tmp_path), steps=6, precision="no", log_every=2, save_every=3, eval_every=0,
                optim=OptimConfig(lr=0.05, min_lr=0.005, warmup_steps=2, weight_decay=0.0, grad_clip=None))
    return TrainConfig(**{**base, **kwargs})


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    one = toy_model()
    train(config(tmp_path / "a"), one, mse, batches(8))
    accumulated = toy_model()
    train(config(tmp_path / "b", grad_accum=2), accumulated, mse, batches(4))
    for a, b in zip(one.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss = mse(model, batch)["loss"]
        return {"loss": loss * float("nan") if calls["n"] in (2, 3) else loss}

    model = toy_model()
    result = train(config(tmp_path), model, sometimes_nan, batches(8))
    assert result.nonfinite_steps == 2 and result.step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())

    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
        train(config(tmp_path / "nan", max_nonfinite=3), toy_model(), lambda m, b: {"loss": mse(m, b)["loss"] * float("nan")}, batches(8))


def test_schedule_and_weight_decay_groups():
    factor = warmup_cosine(OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10), total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.1)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model.temp = nn.Parameter(torch.tensor(0.07))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [(3, 3)] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_recall_and_itm_rerank():
    sim = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.3, 0.7], [0.1, 0.95, 0.2]])  # image 1's best text is 2
    metrics = retrieval_recall(sim, [[0], [1], [2]], [0, 1, 2], ks=(1, 2))
    assert metrics["i2t_r1"] == pytest.approx(1 / 3) and metrics["i2t_r2"] == 1.0
    assert metrics["t2i_r1"] == pytest.approx(1 / 3)  # text 1 -> image 2, text 2 -> image 0

    def itm(images, texts):  # an oracle ITM: high logit for matching pairs
        return (images == texts).float() * 10

    i2t, t2i = rerank_top_k(sim, k=2, itm_scores=itm)
    reranked = retrieval_recall(i2t, [[0], [1], [2]], [0, 1, 2], sim_t2i=t2i, ks=(1,))
    assert reranked["i2t_r1"] == 1.0
    assert reranked["t2i_r1"] == pytest.approx(2 / 3), "text 2's image is outside its ITC top 2: not recoverable"
    assert torch.isinf(i2t[0, 1]) and i2t[0, 0] == pytest.approx(10.9), "outside the top k: -inf; inside: ITM + ITC"
    captions = ["a", "b", "b"]
    same = retrieval_recall(sim, [[0], [1], [2]], [0, 1, 2], captions=captions)
    assert same["i2t_r1_caption"] == 1.0, "texts 1 and 2 share a caption, so both images hit"
    assert same["t2i_r1_caption"] == pytest.approx(2 / 3)


def test_late_starting_parameters_wait_then_warm_up(tmp_path):
    """`start_step`: the named module keeps its weights until that step, then trains; the rest trains at once."""
    factor = warmup_cosine(OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10), total_steps=110, start_step=50)
    assert factor(49) == 0.0 and factor(50) == pytest.approx(0.1 * warmup_cosine(
        OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10), total_steps=110)(50))
    assert factor(59) == pytest.approx(warmup_cosine(OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10), 110)(59))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    start = [p.detach().clone() for p in model.parameters()]
    seen = {}

    def loss(m, batch):
        seen[len(seen)] = [p.detach().clone() for p in m[0].parameters()]
        return mse(m, batch)

    optim = OptimConfig(lr=0.05, min_lr=0.005, warmup_steps=2, weight_decay=0.05, grad_clip=None, start_step={"0": 3})
    train(config(tmp_path, optim=optim), model, loss, batches(8))
    for step in range(4):  # the batches of steps 0..3 see the first layer as it started (3 updates skipped)
        assert all(torch.equal(a, b) for a, b in zip(seen[step], start[:2]))
    assert not torch.equal(model[0].weight, start[0]) and not torch.equal(model[1].weight, start[2])
    groups = param_groups(model, 0.05, 0.05, start_step={"0": 3})
    assert sorted(g["start_step"] for g in groups) == [0, 0, 3, 3]


def test_schedule_keys_must_name_a_trainable_module():
    """A misspelt or frozen module in lr_scale / start_step is an error, not a silent no-op."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)))
    model[0].requires_grad_(False)
    groups = param_groups(model, 0.05, 0.1, lr_scale={"1.0": 0.5, "1.1.bias": 2.0})
    assert sorted(g["lr"] for g in groups) == pytest.approx([0.05, 0.05, 0.1, 0.2])
    for option in ("lr_scale", "start_step"):
        for key in ("2", "1.0.weightt", "0"):  # no such module; a typo; frozen
            with pytest.raises(ConfigError, match=rf"train.optim.{option} names no trainable module.*{key}"):
                param_groups(model, 0.05, 0.1, **{option: {key: 1}})


def test_host_syncs_and_plots_only_when_logging_and_saving(tmp_path, monkeypatch):
    """One host sync per step (the non-finite guard), one per log line; the loss curve is drawn at checkpoints."""
    import lavis_lite.training.train_loop as train_loop

    syncs, plots = {"n": 0}, {"n": 0}

    def counted(method):
        def call(tensor):
            if sys._getframe(1).f_code.co_filename == train_loop.__file__:  # the loop's own reads, not AdamW's
                syncs["n"] += 1
            return method(tensor)

        return call

    def three_parts(model, batch):
        loss = mse(model, batch)["loss"]
        return {"loss": loss, "a": loss * 2, "b": loss * 3}

    monkeypatch.setattr(torch.Tensor, "item", counted(torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "tolist", counted(torch.Tensor.tolist))
    monkeypatch.setattr(train_loop, "plot_loss_curve", lambda *a: plots.__setitem__("n", plots["n"] + 1))
    train(config(tmp_path, steps=6, grad_accum=2, log_every=3, save_every=3), toy_model(), three_parts, batches(4))
    assert syncs["n"] == 6 + 2  # not 6 steps x 2 micro-batches x (3 parts + the guard) = 48
    assert plots["n"] == 2  # checkpoints at steps 3 and 6
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6] and all(h["b"] == pytest.approx(3 * h["loss"]) for h in history)


RANKS_SCRIPT = """
import json, os, sys, time, types
import torch
from torch import nn
import lavis_lite.training.train_loop as train_loop
from lavis_lite.training.train_config import OptimConfig, TrainConfig

out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = nn.Linear(4, 1)
x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
if mode == "clock" and rank == 1:  # this rank's clock jumps an hour once training has started
    real, calls = time.time, [0]
    def jumped():
        calls[0] += 1
        return real() + (3600 if calls[0] > 1 else 0)
    train_loop.time = types.SimpleNamespace(time=jumped)
steps = [0]
def loss(model, batch):
    steps[0] += 1
    value = (model(batch["x"]) - 1).square().mean()
    return {"loss": value * float("nan") if mode == "nan" and rank == 0 and steps[0] == 2 else value}
def batches(start):
    while True:
        yield {"x": x}
cfg = TrainConfig(output_dir=out, steps=6, precision="no", log_every=3, save_every=100, eval_every=0,
                  time_limit_minutes=30 if mode == "clock" else None, optim=OptimConfig(lr=0.05, grad_clip=None))
result = train_loop.train(cfg, model, loss, batches)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"step": result.step, "nonfinite": result.nonfinite_steps,
               "weights": [p.detach().flatten().tolist() for p in model.parameters()]}, f)
"""


@pytest.mark.parametrize("mode", ["clock", "nan"])
def test_every_rank_takes_the_same_decisions(tmp_path, mode):
    """Two processes: one rank's clock passing the time limit stops both after the same step (each deciding on
    its own deadlocks), and one rank's non-finite loss skips the update on both."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen([*launcher, str(script), str(tmp_path), mode], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        proc.communicate()
        pytest.fail("the two ranks deadlocked")
    assert proc.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == (1 if mode == "clock" else 6)
    assert ranks[0]["nonfinite"] == ranks[1]["nonfinite"] == (1 if mode == "nan" else 0)
    assert ranks[0]["weights"] == ranks[1]["weights"] and all(math.isfinite(w) for p in ranks[0]["weights"] for w in p)
