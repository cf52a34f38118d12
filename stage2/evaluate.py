"""Held-out captioning of a stage-2 model on the synthetic shapes: does the caption name every object right?"""

from __future__ import annotations

import re
from collections import Counter

import torch
from tqdm.auto import tqdm

from lavis_lite.data.synthetic import COLOURS, SHAPES
from lavis_lite.data.training_data import HeldOut, TextFields
from lavis_lite.query_diversity import query_similarity
from lavis_lite.stage2_model import Blip2Stage2

from .config import CaptionEvalConfig

_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})s?\b")


def named_objects(caption: str) -> Counter:
    """The (colour, shape) pairs a caption names, e.g. "a small red circle above a large blue star"
    -> {(red, circle): 1, (blue, star): 1}."""
    return Counter(_OBJECT.findall(caption.lower()))


def attribute_accuracy(generated: list[str], truths: list[str]) -> dict[str, float]:
    """Fractions of images whose generated caption names exactly the true objects (`attr`: colour and shape
    of each, as a multiset), and, as diagnostics, exactly the true colours / the true shapes."""
    if len(generated) != len(truths) or not truths:
        raise ValueError(f"{len(generated)} generated captions for {len(truths)} images")
    hits = Counter()
    for caption, truth in zip(generated, truths):
        said, true = named_objects(caption), named_objects(truth)
        hits["attr"] += said == true
        hits["colour"] += Counter(c for c, _ in said.elements()) == Counter(c for c, _ in true.elements())
        hits["shape"] += Counter(s for _, s in said.elements()) == Counter(s for _, s in true.elements())
    return {name: hits[name] / len(truths) for name in ("attr", "colour", "shape")}


@torch.no_grad()
def evaluate_captions(model: Blip2Stage2, held: HeldOut, cfg: CaptionEvalConfig, text: TextFields) -> dict:
    """Held-out captioning: the LM loss of the true captions (`caption_loss`), generated captions with
    examples, and with `cfg.synthetic_attributes` (the synthetic shapes) `caption_attr_acc` (+ colour/shape
    diagnostics) and the same for the LLM given no image (`caption_attr_acc_no_image`: the prompt alone,
    one caption for every image); `query_cosine` as in stage 1's evaluation (1.0: the queries collapsed)."""
    device = model.language_projection.weight.device
    limit = cfg.max_images or len(held.captions)
    truths = held.captions[:limit]
    generated: list[str] = []
    query_out: list[torch.Tensor] = []
    loss_sum, loss_count = 0.0, 0
    settings = {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens}
    with tqdm(total=limit, desc="captioning held-out images", unit="img") as progress:
        for tokens in held.tokens():
            tokens = tokens[: limit - len(generated)].to(device)
            batch = {k: v.to(device) for k, v in text(truths[len(generated) : len(generated) + len(tokens)]).items()}
            loss_sum += model(image_embeds=tokens, **batch).loss.item() * len(tokens)
            query_out.append(model.query_outputs(tokens).float().cpu())
            loss_count += len(tokens)
            generated += model.generate(image_embeds=tokens, **settings)
            progress.update(len(tokens))
            if len(generated) >= limit:
                break
    within_image, across_images = query_similarity(torch.cat(query_out))
    metrics = {
        "caption_loss": loss_sum / loss_count,
        "query_cosine": within_image,
        "query_cosine_across_images": across_images,
        "caption_images": limit,
        "caption_examples": [
            {"key": k, "generated": g, "true": t} for k, g, t in zip(held.keys, generated[: cfg.examples], truths)
        ],
    }
    if cfg.synthetic_attributes:
        no_image = model.generate(batch_size=1, **settings)[0]
        with_image = attribute_accuracy(generated, truths)
        metrics.update(
            caption_attr_acc=with_image["attr"],
            caption_colour_acc=with_image["colour"],
            caption_shape_acc=with_image["shape"],
            caption_attr_acc_no_image=attribute_accuracy([no_image] * limit, truths)["attr"],
            caption_no_image=no_image,
        )
    return metrics
