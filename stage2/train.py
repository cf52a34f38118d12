"""Stage-2 training: `lavis-lite train-stage2 [--config RECIPE] [--resume | --overwrite] [key=value ...]`.

Bridges a stage-1 Q-Former to a frozen LLM through one Linear layer, trains both on the LM loss of the
captions, evaluates held-out captioning, and leaves in `train.output_dir`: checkpoints/, metrics.json,
metrics.jsonl, loss_curve.png, train.log, tensorboard/ and llm/ (a GGUF LLM's dequantised copy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from lavis_lite.config import ConfigError, Stage2ModelConfig
from lavis_lite.data import SkipCounter
from lavis_lite.data.training_data import TrainingData
from lavis_lite.data.webdataset_pipeline import read_images
from lavis_lite.errors import UserError
from lavis_lite.inference.gallery import GalleryItem, write_gallery
from lavis_lite.models.factory import create_stage2_model
from lavis_lite.precision import resolve_autocast
from lavis_lite.training.train_config import training_parser
from lavis_lite.training.train_loop import check_run_dir, train

from .config import Stage2Config, load_stage2_config
from .evaluate import evaluate_captions
from .objective import caption_text, stage2_loss

DEFAULT_CONFIG = "stage2/demo"
log = logging.getLogger("lavis_lite.stage2")


def run(cfg: Stage2Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train and evaluate; returns the final metrics (also in `<output_dir>/metrics.json`). `resume` continues the
    run in `train.output_dir`; `overwrite` replaces an earlier run there (see `lavis_lite.training.train_loop.train`)."""
    check_run_dir(cfg.train, resume, overwrite)  # before the slow set-up
    state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group before data is split by rank
    torch.manual_seed(cfg.train.seed)
    if cfg.model.llm.cache_dir is None:
        cfg.model.llm.cache_dir = str(Path(cfg.train.output_dir) / "llm")
    if cfg.model.stage1_checkpoint and not Path(cfg.model.stage1_checkpoint).exists():
        raise ConfigError(
            f"model.stage1_checkpoint={cfg.model.stage1_checkpoint} does not exist: train stage 1 first "
            "(make stage1), or set model.stage1_checkpoint=null to start from the BERT/random Q-Former"
        )
    with state.main_process_first():  # one process dequantises a GGUF LLM, the others then read its copy
        model = create_stage2_model(_llm_follows_autocast(cfg), device=state.device)
    skipped = SkipCounter()
    data = TrainingData(cfg.data, cfg.model.vision, model.vision, model.tokenizer, cfg.model.max_text_len, skipped)
    text = caption_text(model, cfg.data.seed)
    batches = data.training_batches(text=text)
    held = data.held_out(cfg.eval.batch_size)
    result = train(
        cfg.train,
        model,
        stage2_loss,
        batches,
        evaluate=lambda m: evaluate_captions(m, held, cfg.eval, text),
        run_config=cfg,
        resume=resume,
        overwrite=overwrite,
        observer=skipped,
    )
    log.info("data: %s", skipped.summary())
    if state.is_main_process and result.metrics.get("caption_examples"):
        gallery = write_caption_gallery(cfg, result.metrics)
        log.info("held-out captions with their images: %s", gallery)
    return {**result.metrics, "train_minutes": result.train_seconds / 60, "skipped": skipped.as_dict()}


def _llm_follows_autocast(cfg: Stage2Config) -> Stage2ModelConfig:
    """The model config with `llm.precision=auto` made the training compute dtype: the frozen LLM is cast
    once, where autocast would re-cast its fp32 weights at every op (the run's own config keeps `auto`)."""
    if cfg.model.llm.precision != "auto":
        return cfg.model
    mixed = resolve_autocast(cfg.train.precision)
    llm = dataclasses.replace(cfg.model.llm, precision="fp32" if mixed == "no" else mixed)
    return dataclasses.replace(cfg.model, llm=llm)


def write_caption_gallery(cfg: Stage2Config, metrics: dict) -> Path:
    """`<output_dir>/captions.html`: the example held-out images with generated and true captions."""
    examples = metrics["caption_examples"]
    images = read_images(cfg.data.val_shards, [e["key"] for e in examples])
    items = [
        GalleryItem(images[e["key"]], e["key"], [f"generated: {e['generated']}", f"true: {e['true']}"])
        for e in examples
        if e["key"] in images
    ]
    title = f"held-out captions after {metrics['step']} steps"
    return write_gallery(Path(cfg.train.output_dir) / "captions.html", title, items)


def caption_report(metrics: dict) -> str:
    """Example captions and the attribute accuracy next to the no-image baseline, as readable lines."""
    if "caption_loss" not in metrics:
        return "no evaluation ran"
    lines = [f"held-out captions after {metrics['step']} steps ({metrics['train_minutes']:.1f} min of training):"]
    for example in metrics["caption_examples"]:
        lines.append(f"  generated: {example['generated']}")
        lines.append(f"  true:      {example['true']}")
    lines.append(f"held-out caption loss: {metrics['caption_loss']:.3f}")
    if "caption_attr_acc" not in metrics:
        return "\n".join(lines)
    lines.append(f"no image:    {metrics['caption_no_image']}")
    lines.append(
        f"caption attribute accuracy on {metrics['caption_images']} held-out images (every object's colour and "
        f"shape named): {100 * metrics['caption_attr_acc']:.1f}% (colours {100 * metrics['caption_colour_acc']:.1f}%, "
        f"shapes {100 * metrics['caption_shape_acc']:.1f}%); the LLM without the image: "
        f"{100 * metrics['caption_attr_acc_no_image']:.1f}%"
    )
    return "\n".join(lines)


def build_parser(prog: str = "lavis-lite train-stage2") -> argparse.ArgumentParser:
    return training_parser(prog, __doc__, DEFAULT_CONFIG, "stage2/paper-opt2.7b", "train.steps=100 data.batch_size=8")


def main(argv: list[str] | None = None, prog: str = "lavis-lite train-stage2") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_stage2_config(args.config, args.overrides)
        metrics = run(cfg, resume=args.resume, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    print(caption_report(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
