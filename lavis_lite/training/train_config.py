"""Configuration of the shared training loop (both stages)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from lavis_lite.config import at_least
from lavis_lite.errors import CommandParser
from lavis_lite.precision import resolve_autocast


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (LAVIS's BLIP-2 recipe by default)."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 5000
    weight_decay: float = 0.05  # not applied to norms, biases and the temperature (parameters with < 2 dims)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0  # max gradient norm; None disables clipping
    # Multipliers of lr by module or parameter name, e.g. {qformer: 0.1} (the most specific name wins).
    lr_scale: dict[str, float] = field(default_factory=dict)
    # Steps before module or parameter names start to train, e.g. {qformer: 100}: a pretrained part waits while
    # a new layer learns, then warms up over warmup_steps (its learning rate is 0 until then).
    start_step: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Step-based schedule, precision, logging, evaluation and checkpointing."""

    output_dir: str = "runs/stage1"
    steps: int = 250_000
    grad_accum: int = 1
    precision: str = "auto"  # autocast: auto | fp32 (or no) | bf16 | fp16; auto: bf16 where it is native (lavis_lite.precision)
    seed: int = 42
    log_every: int = 50
    eval_every: int = 5000  # 0: evaluate only at the end
    save_every: int = 5000
    keep_checkpoints: int = 2
    max_nonfinite: int = 50  # abort after this many consecutive steps with a non-finite loss
    time_limit_minutes: Optional[float] = None  # stop (after a checkpoint) once training has run this long
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        at_least("train", self, steps=1, grad_accum=1, log_every=1, save_every=1, keep_checkpoints=1, max_nonfinite=1)
        at_least("train", self, eval_every=0)
        if self.precision != "auto":
            resolve_autocast(self.precision)  # rejects an unknown name


def training_parser(prog: str, description: str, default_config: str, example: str, overrides: str) -> argparse.ArgumentParser:
    """The command line both training programs share: a recipe, `--resume` / `--overwrite`, `key=value`s
    (in any order: parse with `parse_intermixed_args`)."""
    parser = CommandParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"recipe: a YAML path or a packaged name such as {example} (default: {default_config})",
    )
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue the run directory's newest complete checkpoint")
    runs.add_argument("--overwrite", action="store_true", help="start afresh where an earlier run's checkpoints are (deletes them)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {overrides}")
    return parser
