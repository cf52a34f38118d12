"""Zero-shot retrieval evaluation, BLIP-2's protocol: `lavis-lite evaluate --checkpoint DIR [--corpus PATH]`.

Every image is scored against every caption by ITC similarity (the best of the image's query vectors);
recall@1/5/10 is reported text -> image and image -> text, then again after re-ranking each query's top k
(`--rerank-k`, BLIP-2 uses 128; 0 skips it) by ITM logit + ITC similarity. The corpus is a COCO / Flickr30K
Karpathy test JSON (`[{"image": path, "caption": [...]}]`, with `--image-root`), webdataset shards (default:
the checkpoint run's held-out shards) or any other corpus `lavis-lite index` reads. Writes the metrics
(fractions) to `--out` as JSON and prints them as a table.

examples:
  lavis-lite evaluate --checkpoint runs/stage1-demo --rerank-k 16
  lavis-lite evaluate --checkpoint runs/stage1 --corpus coco_karpathy_test.json --image-root coco/images
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from lavis_lite.checkpoint import CONFIG, resolve_checkpoint
from lavis_lite.data import SkipCounter
from lavis_lite.errors import CommandParser, UserError
from lavis_lite.evaluation.retrieval_metrics import evaluate_similarity
from lavis_lite.inference.features import Blip2FeatureExtractor, load_model_and_preprocess
from lavis_lite.io import atomic_write_text, check_writable
from lavis_lite.models.stage1_model import Blip2Stage1

from .corpus import Corpus, ImageProcessor, batched
from .search import add_placement_arguments, int_at_least, placement

DEFAULT_OUT = "runs/retrieval-eval/metrics.json"
SIMILARITY_BLOCK = 64  # images per block of the similarity matrix ([block, texts, queries] floats at a time)


def build_parser(prog: str = "lavis-lite evaluate") -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--checkpoint", required=True, metavar="DIR", help="stage-1 run or checkpoint directory")
    add("--corpus", metavar="PATH",
        help="test set (default: the held-out shards of the checkpoint's run, its data.val_shards)")
    add("--image-root", metavar="DIR", help="root of an annotation file's image paths (default: its folder)")
    add("--rerank-k", type=int_at_least(0), default=128, metavar="K",
        help="ITM re-rank of each query's top K (default: 128, BLIP-2's; 0: ITC only)")
    add("--out", default=DEFAULT_OUT, metavar="FILE", help=f"metrics JSON (default: {DEFAULT_OUT})")
    add("--batch-size", type=int_at_least(1), default=64, metavar="N", help="images / captions per forward pass")
    add("--num-workers", type=int_at_least(1), default=4, metavar="N", help="image decoding threads (default: 4)")
    add_placement_arguments(parser)
    return parser


def embed_corpus(
    model: Blip2FeatureExtractor,
    processor: ImageProcessor,
    corpus: Corpus,
    args: argparse.Namespace,
    skipped: SkipCounter,
) -> tuple[Tensor, Tensor, list[str], list[list[int]], list[int]]:
    """Image vectors [N,Q,E], the images' encoder tokens (CPU; empty without re-ranking), the captions and
    the pairings `img2txt` / `txt2img`, over the images that decode."""
    vectors, embeds, texts, img2txt, txt2img = [], [], [], [], []
    batches = corpus.pixel_batches(corpus.entries(skipped), processor, args.batch_size, skipped, args.num_workers)
    with tqdm(desc="embedding images", unit="img") as progress:
        for entries, pixels in batches:
            tokens = model.encode_images(pixels)
            vectors.append(model.image_vectors(image_embeds=tokens).cpu())
            if args.rerank_k:
                embeds.append(tokens.cpu())
            for entry in entries:
                img2txt.append(list(range(len(texts), len(texts) + len(entry.captions))))
                txt2img += [len(img2txt) - 1] * len(entry.captions)
                texts += entry.captions
            progress.update(len(entries))
    if not vectors:
        raise UserError(f"corpus {corpus.path} has no usable image with a caption ({skipped.summary()})")
    return torch.cat(vectors), (torch.cat(embeds) if embeds else torch.empty(0)), texts, img2txt, txt2img


def held_out_shards(checkpoint: str) -> str:
    """The held-out shards a stage-1 run was trained with (its config's `data.val_shards`)."""
    if not Path(checkpoint).is_dir():
        raise UserError(f"--checkpoint {checkpoint} is not a run directory: give --corpus")
    shards = OmegaConf.select(OmegaConf.load(resolve_checkpoint(checkpoint) / CONFIG), "data.val_shards")
    if not shards:
        raise UserError(f"--checkpoint {checkpoint} records no held-out shards (data.val_shards): give --corpus")
    return str(shards)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation report: metrics (fractions), counts, skips and what was evaluated."""
    corpus = Corpus(args.corpus or held_out_shards(args.checkpoint), image_root=args.image_root, require_captions=True)
    device, dtype = placement(args)
    model, vis_processors, _ = load_model_and_preprocess(args.checkpoint, device=device, dtype=dtype)
    skipped = SkipCounter()
    image_vectors, image_embeds, texts, img2txt, txt2img = embed_corpus(model, vis_processors["eval"], corpus, args, skipped)
    text_vectors = torch.cat([model.text_vectors(batch).cpu() for batch in batched(texts, args.batch_size)])
    sim = torch.cat([Blip2Stage1.itc_similarity(block, text_vectors) for block in image_vectors.split(SIMILARITY_BLOCK)])
    rerank = f"ITM re-rank of the top {args.rerank_k}"
    progress = tqdm(total=sum(sim.shape), desc=rerank, unit="query", disable=not args.rerank_k)

    def itm(images: Tensor, captions: Tensor) -> Tensor:
        progress.update(1)
        return model.itm_scores(image_embeds=image_embeds[images], texts=[texts[t] for t in captions.tolist()]).cpu()

    with progress:
        metrics = evaluate_similarity(sim, img2txt, txt2img, rerank_k=args.rerank_k, itm_scores=itm, captions=texts)
    return {
        "checkpoint": args.checkpoint,
        "checkpoint_id": model.checkpoint_id,
        "corpus": corpus.describe(),
        "images": len(img2txt),
        "texts": len(texts),
        "rerank_k": args.rerank_k,
        "skipped": skipped.as_dict(),
        "metrics": metrics,
    }


def format_report(report: dict[str, Any]) -> str:
    """Recall@1/5/10 both ways, ITC and re-ranked, next to chance, as aligned lines."""
    metrics = report["metrics"]
    lines = [f"retrieval on {report['corpus']['path']}: {report['images']} images, {report['texts']} captions"]
    lines.append(f"{'':<34}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    rows = [("", "ITC")] + ([("itm_", f"ITC + ITM, top {report['rerank_k']}")] if report["rerank_k"] else [])
    for prefix, ranking in rows:
        for direction, name in (("t2i", "text -> image"), ("i2t", "image -> text")):
            cells = "".join(f"{100 * metrics[f'{prefix}{direction}_r{k}']:>7.1f}%" for k in (1, 5, 10))
            lines.append(f"{f'{name} ({ranking})':<34}{cells}")
    chance = "".join(f"{100 * metrics[f'chance_r{k}']:>7.1f}%" for k in (1, 5, 10))
    lines.append(f"{'chance (text -> image)':<34}{chance}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "lavis-lite evaluate") -> int:
    """Evaluate; exit status 0, or 2 with `error: ...` on stderr for a bad checkpoint or corpus."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_writable(args.out, "--out")
        report = evaluate(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"metrics written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
