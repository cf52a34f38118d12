"""Why a stage-2 run reads little of the image: query collapse, soft-prompt spread and caption loss by word kind.

On held-out images of the run's data:
  query outputs  mean cosine between the different query outputs of one image (1.0: every query says the same,
                 so the LLM gets one vector many times) and between two images for the same query (1.0: the
                 image is ignored); the first also after the Q-Former's embeddings and after each of its layers,
                 which shows where the queries merge (self-attention mixes the queries of an image);
  soft prompts   (stage 2) the norm of their image-dependent part over the norm of their mean over images; the
                 LLM's RMSNorm reads directions, so a small ratio leaves the image a small perturbation;
  caption loss   (stage 2, decoder-only LLMs) the LM loss of the true captions in nats per word, by word kind
                 (colour, shape, size, position, other), next to chance for colours (ln 8) and shapes (ln 6).
                 Without a prompt the first caption word (a / an / there, never an attribute) is left out:
                 its prediction comes from the soft prompts' last position, which `Blip2Stage2` does not return.

    python tools/stage2_diagnostics.py --checkpoint runs/stage2-demo       # a trained stage-2 run
    python tools/stage2_diagnostics.py --config configs/stage2/demo.yaml   # a recipe's untrained start
    python tools/stage2_diagnostics.py --config configs/stage2/demo.yaml model.stage1_checkpoint=null
    python tools/stage2_diagnostics.py --stage1 runs/stage1-demo           # a stage-1 run: query outputs only
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavis_lite.checkpoint import CONFIG, resolve_checkpoint
from lavis_lite.data.training_data import TrainingData
from lavis_lite.demo.synthetic import COLOURS, SHAPES, SIZES
from lavis_lite.evaluation.query_diversity import qformer_hidden_states, query_similarity
from lavis_lite.models.factory import create_stage2_model, load_stage1_checkpoint, load_stage2_checkpoint
from lavis_lite.models.llm import IGNORE
from lavis_lite.models.stage2_model import Blip2Stage2
from lavis_lite.stage1.config import load_stage1_config
from lavis_lite.stage2.config import load_stage2_config
from lavis_lite.stage2.objective import caption_text

POSITION_WORDS = {"left", "right", "top", "bottom", "center", "corner", "above", "below"}
CHANCE = {"colour": math.log(len(COLOURS)), "shape": math.log(len(SHAPES))}


def spread_ratio(soft: Tensor) -> float:
    """Norm of the image-dependent part of soft prompts [B,Q,W] over the norm of their mean over images."""
    soft = soft.float()
    mean = soft.mean(0, keepdim=True)
    return ((soft - mean).norm(dim=-1).mean() / mean.norm(dim=-1).mean()).item()


def word_kind(word: str) -> str:
    word = word.lower().strip(".,")
    if word in COLOURS:
        return "colour"
    if word in SHAPES or word.removesuffix("s") in SHAPES or word.removesuffix("es") in SHAPES:
        return "shape"
    if word in SIZES:
        return "size"
    return "position" if word in POSITION_WORDS else "other"


def token_word_index(tokenizer, ids: list[int]) -> list[int]:
    """For each token, the index of the decoded word it belongs to (-1 for special tokens such as EOS)."""
    special = set(tokenizer.all_special_ids)
    return [
        -1 if ids[end - 1] in special else len(tokenizer.decode(ids[:end], skip_special_tokens=True).split()) - 1
        for end in range(1, len(ids) + 1)
    ]


@torch.no_grad()
def loss_by_word_kind(model: Blip2Stage2, vision_tokens: Tensor, captions: list[str]) -> dict[str, tuple[float, int]]:
    """Mean LM loss per word (nats, summed over a word's tokens) by word kind, with the number of words."""
    if model.is_encoder_decoder:
        raise ValueError("loss by word kind reads decoder-only layouts (an encoder-decoder sees a random prefix)")
    batch = caption_text(model, seed=0)(captions)
    out = model(vision_tokens=vision_tokens, **batch)
    # out.logits[:, t] predicts the text token t + 1.
    labels = batch["labels"][:, 1:]
    nats = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    nats = nats.view(labels.shape)
    losses: dict[str, list[float]] = defaultdict(list)
    for row in range(len(captions)):
        caption = batch["labels"][row] != IGNORE
        ids = batch["labels"][row][caption].tolist()
        words = model.tokenizer.decode(ids, skip_special_tokens=True).split()
        per_word: dict[int, float] = defaultdict(float)
        row_nats = nats[row][caption[1:]].tolist()  # all caption tokens after a prompt, all but the first without
        for index, loss in zip(token_word_index(model.tokenizer, ids)[len(ids) - len(row_nats) :], row_nats):
            per_word[index] += loss
        for index, loss in per_word.items():
            losses["other" if index < 0 else word_kind(words[index])].append(loss)
    return {kind: (sum(v) / len(v), len(v)) for kind, v in losses.items()}


def report_queries(qformer: nn.Module, queries_only_pass: Callable[[], object]) -> None:
    hidden = qformer_hidden_states(qformer, queries_only_pass)
    within, across = query_similarity(hidden[-1])
    by_layer = " ".join(f"{query_similarity(h)[0]:.4f}" for h in hidden)
    print(f"query outputs: cosine between the queries of one image {within:.4f}, between images (same query) {across:.4f}")
    print(f"  between the queries of one image after the embeddings, then each layer: {by_layer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a stage-2 run directory or checkpoint")
    source.add_argument("--config", help="a stage-2 recipe: its untrained model (stage-1 Q-Former, fresh Linear)")
    source.add_argument("--stage1", help="a stage-1 run directory or checkpoint (query outputs only)")
    parser.add_argument("--images", type=int, default=100, help="held-out images to measure on (default 100)")
    parser.add_argument("overrides", nargs="*", help="with --config: recipe overrides, e.g. model.stage1_checkpoint=null")
    args = parser.parse_args()
    if args.overrides and not args.config:
        parser.error("key=value overrides apply to --config only")
    torch.manual_seed(0)
    if args.stage1:
        model, _ = load_stage1_checkpoint(args.stage1)
        cfg = load_stage1_config(resolve_checkpoint(args.stage1) / CONFIG)
    elif args.checkpoint:
        model = load_stage2_checkpoint(args.checkpoint)
        cfg = load_stage2_config(resolve_checkpoint(args.checkpoint) / CONFIG)
    else:
        cfg = load_stage2_config(args.config, args.overrides)
        cfg.model.llm.cache_dir = cfg.model.llm.cache_dir or str(Path(cfg.train.output_dir) / "llm")  # as training does
        model = create_stage2_model(cfg.model)
    data = TrainingData(cfg.data, cfg.model.vision, model.vision, None, cfg.model.max_text_len, None)
    cache = data.cache(cfg.data.val_shards, "val")
    count = min(args.images, len(cache.keys))
    vision_tokens, captions = cache.tokens(range(count)).float(), cache.captions[:count]
    with torch.no_grad():
        if args.stage1:
            report_queries(model.qformer, lambda: model.image_features(model.ln_vision(vision_tokens))[0])
            return
        report_queries(model.qformer, lambda: model.query_outputs(vision_tokens))
        soft = model.soft_prompts(vision_tokens)
    embedding_norm = model.llm.get_input_embeddings().weight.norm(dim=-1).mean().item()
    print(
        f"soft prompts: norm {soft.float().norm(dim=-1).mean():.1f} (LLM token embeddings: {embedding_norm:.1f}), "
        f"image-dependent part / mean over images {spread_ratio(soft):.3f}"
    )
    print(f"caption loss by word kind on {count} held-out captions (nats per word):")
    for kind, (loss, words) in sorted(loss_by_word_kind(model, vision_tokens, captions).items()):
        chance = f"  (chance {CHANCE[kind]:.2f})" if kind in CHANCE else ""
        print(f"  {kind:9s} {loss:6.3f} over {words} words{chance}")


if __name__ == "__main__":
    main()
