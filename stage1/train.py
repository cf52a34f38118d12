"""Stage-1 training: `lavis-lite train-stage1 [--config RECIPE] [--resume | --overwrite] [key=value ...]`.

Trains the Q-Former against the frozen image encoder with ITC + ITM + ITG, evaluates held-out
retrieval, and leaves in `train.output_dir`: checkpoints/, metrics.json, metrics.jsonl, loss_curve.png,
train.log and tensorboard/. Multi-process: `accelerate launch --num_processes N -m stage1.train ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from accelerate import PartialState

from lavis_lite.config import ConfigError
from lavis_lite.data import SkipCounter
from lavis_lite.errors import UserError
from lavis_lite.models.factory import create_model
from lavis_lite.training.train_config import training_parser
from lavis_lite.training.train_loop import check_run_dir, train

from .config import Stage1Config, load_stage1_config
from .data import stage1_data
from .evaluate import evaluate_retrieval
from .objective import stage1_loss

DEFAULT_CONFIG = "stage1/demo"
log = logging.getLogger("lavis_lite.stage1")


def run(cfg: Stage1Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train and evaluate; returns the final metrics (also in `<output_dir>/metrics.json`). `resume` continues the
    run in `train.output_dir`; `overwrite` replaces an earlier run there (see `lavis_lite.training.train_loop.train`)."""
    check_run_dir(cfg.train, resume, overwrite)  # before the slow set-up
    PartialState(cpu=not torch.cuda.is_available())  # joins the process group before data is split by rank
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = create_model(cfg.model)
    if tokenizer is None:
        raise ConfigError("stage 1 needs a tokenizer: set model.qformer.bert (or model.qformer.tokenizer)")
    skipped = SkipCounter()
    data = stage1_data(cfg, model, tokenizer, skipped)
    batches = data.training_batches()
    held = data.held_out(cfg.eval.batch_size)
    result = train(
        cfg.train,
        model,
        stage1_loss,
        batches,
        evaluate=lambda m: evaluate_retrieval(m, tokenizer, held, cfg.eval, cfg.model.max_text_len),
        run_config=cfg,
        resume=resume,
        overwrite=overwrite,
        observer=skipped,
        find_unused_parameters=set(cfg.model.losses) != {"itc", "itm", "itg"},
    )
    log.info("data: %s", skipped.summary())
    metrics = {**result.metrics, "train_minutes": result.train_seconds / 60, "skipped": skipped.as_dict()}
    return metrics


def build_parser(prog: str = "lavis-lite train-stage1") -> argparse.ArgumentParser:
    return training_parser(prog, __doc__, DEFAULT_CONFIG, "stage1/paper-vitg", "train.steps=100 data.batch_size=64")


def main(argv: list[str] | None = None, prog: str = "lavis-lite train-stage1") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        metrics = run(load_stage1_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    print(recall_table(metrics))
    return 0


def recall_table(metrics: dict) -> str:
    """Held-out recall next to chance, as a few readable lines."""
    if "t2i_r1" not in metrics:
        return "no evaluation ran"
    lines = [f"held-out retrieval, {metrics['count']} pairs, after {metrics['step']} steps "
             f"({metrics['train_minutes']:.1f} min of training):"]
    lines.append(f"{'':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'R@1 (same caption)':>21}")
    for direction, name in (("t2i", "text -> image"), ("i2t", "image -> text")):
        row = "".join(f"{100 * metrics[f'{direction}_r{k}']:>7.1f}%" for k in (1, 5, 10))
        lines.append(f"{name:<16}{row}{100 * metrics[f'{direction}_r1_caption']:>20.1f}%")
    lines.append(f"{'chance':<16}" + "".join(f"{100 * metrics[f'chance_r{k}']:>7.1f}%" for k in (1, 5, 10)))
    lines.append(f"query outputs: mean cosine between the queries of one image {metrics['query_cosine']:.3f} "
                 "(1.0: collapsed into one vector)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
