"""Held-out captioning of a stage-2 model on the synthetic shapes: does the caption name every object right?"""

from __future__ import annotations

import re
from collections import Counter

import torch
from tqdm.auto import tqdm

from lavis_lite.data.training_data import HeldOut, TextFields
from lavis_lite.demo.synthetic import COLOURS, SHAPES
from lavis_lite.distributed import gather_objects, world
from lavis_lite.evaluation.query_diversity import query_similarity
from lavis_lite.models.stage2_model import Blip2Stage2

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
    """Held-out captioning, the chunks of held-out images shared out over the ranks (every rank returns all of
    it): the LM loss of the true captions (`caption_loss`), generated captions with
    examples, and with `cfg.synthetic_attributes` (the synthetic shapes) `caption_attr_acc` (+ colour/shape
    diagnostics) and the same for the LLM given no image (`caption_attr_acc_no_image`: the prompt alone,
    one caption for every image); `query_cosine` as in stage 1's evaluation (1.0: the queries collapsed)."""
    device = model.language_projection.weight.device
    limit = cfg.max_images or len(held.captions)
    truths = held.captions[:limit]
    settings = {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens}
    rank, size = world()
    mine = []  # this rank's chunks (every size-th): (offset, captions, summed loss, query outputs)
    offset = 0
    with tqdm(total=limit, desc="captioning held-out images", unit="img", disable=rank != 0) as progress:
        for index, tokens in enumerate(held.tokens()):
            tokens = tokens[: limit - offset].to(device)
            if index % size == rank:
                batch = {k: v.to(device) for k, v in text(truths[offset : offset + len(tokens)]).items()}
                loss = model(vision_tokens=tokens, **batch).loss.item() * len(tokens)
                queries = model.query_outputs(tokens).float().cpu()
                mine.append((offset, model.generate(vision_tokens=tokens, **settings), loss, queries))
            offset += len(tokens)
            progress.update(len(tokens))
            if offset >= limit:
                break
    chunks = sorted((chunk for ranks in gather_objects(mine) for chunk in ranks), key=lambda chunk: chunk[0])
    generated = [caption for chunk in chunks for caption in chunk[1]]
    loss_sum = sum(chunk[2] for chunk in chunks)
    within_image, across_images = query_similarity(torch.cat([chunk[3] for chunk in chunks]))
    metrics = {
        "caption_loss": loss_sum / len(generated),
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
