"""The one training loop (stage 1 and stage 2): accelerate, AdamW + warm-up/cosine, checkpoints, resume, logs.

The data source is a function `batches(micro_step) -> iterator of batches` positioned at a micro-step,
so that a resumed run continues the data stream where the checkpoint left it. Batches are not passed
through `accelerator.prepare` (webdataset shards by node/worker itself; sharding twice would drop data).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from lavis_lite.checkpoint import (
    checkpoints,
    latest_checkpoint,
    load_training_state,
    load_trainable_state_dict,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lavis_lite.config import ConfigError
from lavis_lite.distributed import gather_objects
from lavis_lite.io import atomic_write_text, check_writable, remove_dir, remove_staging
from lavis_lite.precision import resolve_autocast
from lavis_lite.training.plots import plot_loss_curve
from lavis_lite.training.train_config import OptimConfig, TrainConfig

log = logging.getLogger("lavis_lite.train")

LossFn = Callable[[nn.Module, dict], dict[str, Tensor]]  # returns {"loss": total, <part>: value, ...}
BatchSource = Callable[[int], Iterator[dict]]
Evaluate = Callable[[nn.Module], dict[str, float]]


class BatchObserver(Protocol):
    """Sees every batch before the model (e.g. counts skipped samples); its state is checkpointed."""

    def update(self, batch: dict) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    nonfinite_steps: int = 0
    train_seconds: float = 0.0


def in_module(name: str, prefix: str) -> bool:
    """Whether parameter `name` is `prefix` or lies in the module `prefix`."""
    return name == prefix or name.startswith(prefix + ".")


def _most_specific(name: str, by_prefix: dict, default):
    """The value of the longest module-name prefix of parameter `name` in `by_prefix`, else `default`."""
    matches = [prefix for prefix in by_prefix if in_module(name, prefix)]
    return by_prefix[max(matches, key=len)] if matches else default


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: Optional[float] = None,
    lr_scale: Optional[dict[str, float]] = None,
    start_step: Optional[dict[str, int]] = None,
) -> list[dict]:
    """Weight decay on matrices only: norms, biases and the temperature (< 2 dims) are not decayed.

    `lr_scale` maps module names to multipliers of `lr` (the most specific name wins), e.g. a pretrained
    Q-Former ({"qformer": 0.1}) fine-tuned slower than a new bridge layer; groups then carry their own `lr`.
    `start_step` maps module names to the step at which they start to train (their learning rate is 0 until
    then, then warms up as the schedule does); each group carries its `start_step`.
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for option, by_prefix in (("lr_scale", lr_scale), ("start_step", start_step)):
        unknown = [key for key in by_prefix or {} if not any(in_module(n, key) for n in trainable)]
        if unknown:
            modules = sorted({n.split(".")[0] for n in trainable})
            raise ConfigError(f"train.optim.{option} names no trainable module or parameter: {', '.join(unknown)}; "
                              f"name one of {modules} or a submodule such as {trainable[0].rsplit('.', 1)[0]}")
    groups: dict[tuple[float, int, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = _most_specific(name, lr_scale or {}, 1.0)
            start = _most_specific(name, start_step or {}, 0)
            groups.setdefault((scale, start, p.ndim >= 2), []).append(p)
    out = []
    for (scale, start, decayed), params in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1], not item[0][2])):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0, "start_step": start}
        if lr_scale:
            group["lr"] = lr * scale
        out.append(group)
    return out


def warmup_cosine(optim: OptimConfig, total_steps: int, start_step: int = 0) -> Callable[[int], float]:
    """Multiplier of `lr`: linear warm-up from 0, then cosine down to `min_lr` at `total_steps`. Parameters
    that start late are at 0 before `start_step`, then warm up over `warmup_steps` onto the same cosine."""

    def factor(step: int) -> float:
        if step < start_step:
            return 0.0
        warm = min(1.0, (step - start_step + 1) / optim.warmup_steps)
        progress = min(1.0, max(0, step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        floor = optim.min_lr / optim.lr
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    if not is_main:
        return
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("lavis_lite")
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in root.handlers):
        root.addHandler(handler)


def train(
    cfg: TrainConfig,
    model: nn.Module,
    loss_fn: LossFn,
    batches: BatchSource,
    evaluate: Optional[Evaluate] = None,
    run_config: Any = None,
    resume: bool = False,
    observer: Optional[BatchObserver] = None,
    find_unused_parameters: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train `model` for `cfg.steps` optimizer steps; returns the final step and evaluation metrics.

    `evaluate` runs on every process (it splits its work across ranks) every `cfg.eval_every` steps and at the
    end; `run_config` is saved with each checkpoint. `resume` continues from the run directory's newest complete
    checkpoint (ConfigError when it has none). A run directory that holds an earlier run's checkpoints is
    refused unless `resume`, or `overwrite` (which deletes that run's checkpoints and logs first). A run deletes
    only checkpoints it wrote itself, keeping its newest `cfg.keep_checkpoints`.
    """
    run = _Run.start(cfg, model, run_config, observer, find_unused_parameters, resume, overwrite)
    step, nonfinite_total = run.resume() if resume else (0, 0)
    run.prepare()
    stream = batches(step * cfg.grad_accum)
    progress = tqdm(total=cfg.steps, initial=step, desc="train", disable=not run.is_main, dynamic_ncols=True)
    started, consecutive_nonfinite, window, window_start = time.time(), 0, [], time.time()
    metrics: dict[str, float] = {}
    while step < cfg.steps:
        parts, finite = run.accumulate(loss_fn, stream)
        over_time = cfg.time_limit_minutes is not None and (time.time() - started) / 60 >= cfg.time_limit_minutes
        poisoned, out_of_time = run.stop_flags(finite, over_time)
        if poisoned:
            nonfinite_total += 1
            consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss, update skipped (%d so far)", step, nonfinite_total)
            if consecutive_nonfinite >= cfg.max_nonfinite:
                raise RuntimeError(
                    f"{consecutive_nonfinite} consecutive steps had a non-finite loss: lower train.optim.lr, "
                    "use train.precision=bf16 instead of fp16, or check the data"
                )
        else:
            consecutive_nonfinite = 0
            window.append(parts)
        run.update(apply=not poisoned)
        step += 1
        progress.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            run.log(_log_window(window, step, run.scheduler.get_last_lr()[0], time.time() - window_start), progress)
            window, window_start = [], time.time()
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            run.checkpoint(step, nonfinite_total)
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            metrics = run.evaluate(evaluate, step)
        if out_of_time:
            log.warning("time limit of %.1f min reached at step %d; stopping", cfg.time_limit_minutes, step)
            break
    progress.close()
    train_seconds = time.time() - started
    if evaluate is not None:
        metrics = run.evaluate(evaluate, step)
    run.close()
    return TrainResult(step, metrics, nonfinite_total, train_seconds)


def check_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> list[Path]:
    """The earlier run's complete checkpoints in `cfg.output_dir`, once it is clear that this run may go on
    there: ConfigError for `resume` without a checkpoint, or for an earlier run's checkpoints without
    `resume` or `overwrite`. Programs call it before their slow set-up; `train` calls it again."""
    run_dir = Path(cfg.output_dir)
    check_writable(run_dir, "train.output_dir", directory=True)
    earlier = checkpoints(run_dir)
    if resume and not earlier:
        raise ConfigError(f"--resume: {run_dir} holds no complete checkpoint to resume from: drop --resume to start the run")
    if not resume and earlier and not overwrite:
        raise ConfigError(
            f"{run_dir} holds the checkpoints of an earlier run (newest: {earlier[-1].name}): continue it with "
            "--resume, start afresh with --overwrite (deletes its checkpoints and logs), or set "
            "train.output_dir to another directory"
        )
    return earlier


@dataclass
class _Run:
    """One training run's parts (accelerator, model, optimizer, schedule, run directory) and what it does with
    them beside the loop itself: resume, one step's forward/backward and update, logs, checkpoints, evaluation."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    run_dir: Path
    run_config: Any
    observer: Optional[BatchObserver]
    unwrapped: Optional[nn.Module] = None
    writer: Any = None
    written: list[Path] = field(default_factory=list)  # the checkpoints this run wrote, oldest first

    @classmethod
    def start(
        cls,
        cfg: TrainConfig,
        model: nn.Module,
        run_config: Any,
        observer: Optional[BatchObserver],
        find_unused: bool,
        resume: bool,
        overwrite: bool,
    ) -> "_Run":
        run_dir = Path(cfg.output_dir)
        earlier = check_run_dir(cfg, resume, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        precision = resolve_autocast(cfg.precision)
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # without it, accelerate treats CPU processes as independent runs
            mixed_precision=precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )
        accelerator.wait_for_everyone()  # every rank has looked at the run directory before it changes
        if accelerator.is_main_process:
            if earlier and not resume:  # overwrite
                _clear_run(run_dir)
            for leftover in remove_staging(run_dir / "checkpoints"):
                log.warning("removed %s, left by an interrupted checkpoint write", leftover)
        accelerator.wait_for_everyone()
        _setup_logging(run_dir, accelerator.is_main_process)
        log.info("precision: %s (train.precision=%s), %d process(es)", precision, cfg.precision, accelerator.num_processes)
        set_seed(cfg.seed + accelerator.process_index)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_scale, cfg.optim.start_step),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        # Stepped by hand, once per optimizer step: accelerate's prepared scheduler steps once per process.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [warmup_cosine(cfg.optim, cfg.steps, group["start_step"]) for group in optimizer.param_groups]
        )
        return cls(cfg, accelerator, model, optimizer, scheduler, run_dir, run_config, observer)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def resume(self) -> tuple[int, int]:
        """Load the run directory's latest checkpoint; returns its step and non-finite step count."""
        checkpoint = latest_checkpoint(self.run_dir)
        load_trainable_state_dict(self.model, load_weights(checkpoint), str(checkpoint))
        state = load_training_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][min(self.accelerator.process_index, len(state["rng"]) - 1)])
        if self.observer is not None and state.get("observer") is not None:
            self.observer.load_state_dict(state["observer"])
        log.info("resumed from %s at step %d", checkpoint, state["step"])
        _truncate_history(self.run_dir / "metrics.jsonl", state["step"])
        return state["step"], state["nonfinite_steps"]

    def prepare(self) -> None:
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.writer = _tensorboard(self.run_dir) if self.is_main else None

    def accumulate(self, loss_fn: LossFn, stream: Iterator[dict]) -> tuple[dict[str, Tensor], Tensor]:
        """Forward and backward over one step's micro-batches: the mean loss parts and whether all were finite
        (device tensors: nothing here waits for the device)."""
        self.model.train()
        parts: dict[str, Tensor] = {}
        finite = torch.ones((), device=self.accelerator.device)
        for micro in range(self.cfg.grad_accum):
            batch = _to_device(next(stream), self.accelerator.device)
            if self.observer is not None:
                self.observer.update(batch)
            # Gradients are all-reduced only on the last micro-batch of a step.
            last = micro == self.cfg.grad_accum - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    losses = loss_fn(self.model, batch)
                self.accelerator.backward(losses["loss"] / self.cfg.grad_accum)
            finite = finite * torch.isfinite(losses["loss"].detach())
            for name, value in losses.items():
                parts[name] = parts.get(name, 0.0) + value.detach().float() / self.cfg.grad_accum
        return parts, finite

    def stop_flags(self, finite: Tensor, over_time: bool) -> tuple[bool, bool]:
        """The step's one host sync, and every rank's decisions in it: a non-finite loss on any rank skips the
        update, and the time limit passed on any rank's clock stops all of them after this step.
        (accelerate's reduce knows sum, mean and max: the flags say "stop", so max is "any rank")."""
        stop = torch.stack([1 - finite, torch.tensor(float(over_time), device=finite.device)])
        if self.accelerator.num_processes > 1:
            stop = self.accelerator.reduce(stop, reduction="max")
        poisoned, out_of_time = (flag > 0 for flag in stop.tolist())
        return poisoned, out_of_time

    def update(self, apply: bool) -> None:
        """Clip and apply the gradients (unless the step was skipped), clear them and advance the schedule."""
        if apply:
            if self.cfg.optim.grad_clip is not None:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def log(self, record: dict[str, float], progress: tqdm) -> None:
        if self.is_main and record:
            progress.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "itc", "itm", "itg")})
            _append_history(self.run_dir / "metrics.jsonl", record)
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def checkpoint(self, step: int, nonfinite_total: int) -> None:
        """Every rank's RNG state gathered; the main process writes the checkpoint and re-plots the loss curve."""
        states = gather_objects(rng_state())
        if self.is_main:
            saved = save_checkpoint(
                self.run_dir,
                step,
                self.unwrapped,
                {
                    "step": step,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": states,
                    "nonfinite_steps": nonfinite_total,
                    "observer": self.observer.state_dict() if self.observer is not None else None,
                },
                self.run_config if self.run_config is not None else self.cfg,
            )
            self.written.append(saved)
            for old in self.written[: -self.cfg.keep_checkpoints]:
                remove_dir(old)
            self.written = self.written[-self.cfg.keep_checkpoints :]
            if (self.run_dir / "metrics.jsonl").is_file():
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
        self.accelerator.wait_for_everyone()

    def evaluate(self, evaluate: Evaluate, step: int) -> dict:
        """Evaluate on every process (the evaluation splits its work across ranks and returns the whole result
        on each); the main process writes metrics.json atomically and to TensorBoard."""
        self.unwrapped.eval()
        with torch.no_grad(), self.accelerator.autocast():
            metrics = {"step": step, **evaluate(self.unwrapped)}
        if self.is_main:
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"eval/{key}", value, step)
            log.info("eval at step %d: %s", step, json.dumps(metrics))
        self.accelerator.wait_for_everyone()
        return metrics

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.accelerator.end_training()


def _clear_run(run_dir: Path) -> None:
    """An earlier run's checkpoints and logs, deleted for `overwrite` (other files, e.g. an LLM cache, stay)."""
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "metrics.json", "loss_curve.png", "train.log"):
        (run_dir / name).unlink(missing_ok=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _log_window(window: list[dict[str, Tensor]], step: int, lr: float, seconds: float) -> dict[str, float]:
    """Mean of each loss over the steps since the last log line, with lr and step time (one host sync)."""
    if not window:
        return {}
    means = torch.stack([torch.stack([w[key] for w in window]).mean() for key in window[0]]).tolist()
    record = dict(zip(window[0], means))
    record.update(step=step, lr=lr, seconds_per_step=seconds / len(window))
    log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
    return record


def _append_history(path: Path, record: dict[str, float]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_history(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))

