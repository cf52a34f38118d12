"""Search a retrieval index built by `lavis-lite index`: texts -> images, or images -> texts.

Text queries search an image index (target=image); `--image` queries search a text index (target=text). Hits
are ranked by ITC similarity (the best of the image's query vectors); `--rerank N` re-scores the top N with the
ITM head as BLIP-2 does: final score = ITM match logit + ITC similarity (text -> image re-opens the candidate
images from the corpus). Prints a table (default) or JSON; `--html` also writes a gallery of the hits.

examples:
  lavis-lite search --index runs/retrieval-demo/index "a red circle" "a large blue square on the left"
  lavis-lite search --index runs/retrieval-demo/index --rerank 20 -k 5 --html hits.html "a red circle"
  lavis-lite search --index runs/retrieval-demo/text-index --image photo.jpg --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from lavis_lite.errors import CommandParser, UserError
from lavis_lite.inference.features import Blip2FeatureExtractor, load_model_and_preprocess
from lavis_lite.inference.gallery import GalleryItem, GallerySection, thumbnail, write_sections
from lavis_lite.inference.preprocess import ImageError, open_image
from lavis_lite.io import check_writable
from lavis_lite.precision import DTYPES, resolve_device, resolve_dtype

from .corpus import ImageProcessor, batched, corpus_roots, describe_locator, open_item_image
from .index import Hit, RetrievalIndex
from .metadata import IndexLoadError

log = logging.getLogger("lavis_lite.retrieval")
TextCleaner = Callable[[str], str]  # a model's text processor
BUILD_FIELDS = ("target", "checkpoint_id", "source")  # what lavis-lite index writes into the manifest and search reads
ITM_BATCH = 64  # candidate pairs per ITM forward pass


def int_at_least(minimum: int):
    """argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--precision`: where the model runs and what it computes in (`placement` reads them)."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="model device (default: auto)")
    parser.add_argument("--precision", choices=["auto", *DTYPES], default="auto",
                        help="what the model computes in (default: auto, bf16 where the device runs it natively)")


def placement(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """The device and compute dtype that `--device` and `--precision` name."""
    device = resolve_device(args.device)
    return device, resolve_dtype(args.precision, device, "--precision")


def build_parser(prog: str = "lavis-lite search") -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--index", required=True, metavar="DIR", help="index directory (the output_dir of lavis-lite index)")
    add("queries", nargs="*", metavar="TEXT", help="text queries (search an image index)")
    add("--image", action="append", default=[], metavar="PATH", help="an image query (searches a text index); repeatable")
    add("--checkpoint", metavar="DIR", help="stage-1 run or checkpoint (default: the one the index was built with)")
    add("-k", "--top-k", type=int_at_least(1), default=5, metavar="N", help="hits per query (default: 5)")
    add("--rerank", type=int_at_least(0), default=0, metavar="N", help="ITM re-rank of the top N (default: 0, off)")
    add("--json", action="store_true", help="print JSON instead of a table")
    add("--html", metavar="FILE", help="also write an HTML gallery of the hits")
    add_placement_arguments(parser)
    add("--nprobe", type=int_at_least(1), metavar="N", help="IVF lists searched (default: the index's)")
    add("--ef-search", type=int_at_least(1), metavar="N", help="HNSW beam width (default: the index's)")
    return parser


@dataclass
class QueryResult:
    """One query's hits, best first: dicts with rank, score (final), itc, itm (None unless re-ranked),
    item_id and the item's metadata."""

    query: str
    hits: list[dict[str, Any]]
    image: Optional[Image.Image] = None  # the query image of an image -> text search


def open_index(path: str) -> RetrievalIndex:
    """The index at `path`; ValueError saying what is wrong and what to give instead."""
    if not Path(path).exists():
        raise UserError(f"index not found: {path} (build one: lavis-lite index output_dir={path}, or make index)")
    try:
        index = RetrievalIndex.load(path)
    except IndexLoadError as err:
        raise UserError(f"--index {path} is not a usable retrieval index: {err}") from None
    missing = [key for key in BUILD_FIELDS if key not in index.manifest]
    if missing:
        raise UserError(f"--index {path} was not built by lavis-lite index (its manifest lacks {missing}): rebuild it")
    return index


def check_queries(args: argparse.Namespace, target: str) -> list[Image.Image]:
    """Queries that fit the index; returns the opened query images. ValueError (ImageError) naming the problem."""
    if not args.queries and not args.image:
        raise UserError("no query given: give text queries, or --image PATH for a text index")
    if any(not q.strip() for q in args.queries):
        raise UserError('empty query: every text query needs at least one word, e.g. "a red circle"')
    if args.queries and target != "image":
        raise UserError(
            f"text queries search an image index, but {args.index} indexes texts (target={target}): "
            "give --image PATH, or search an index built with target=image"
        )
    if args.image and target != "text":
        raise UserError(
            f"--image searches a text index, but {args.index} indexes images (target={target}): "
            "give text queries, or build a text index with target=text"
        )
    return [open_image(path) for path in args.image]


def load_model(args: argparse.Namespace, manifest: dict) -> tuple[Blip2FeatureExtractor, ImageProcessor, TextCleaner]:
    """The model that embeds the queries, checked against the one the index was built with."""
    checkpoint = args.checkpoint or manifest["source"]
    try:
        device, dtype = placement(args)
        model, vis_processors, txt_processors = load_model_and_preprocess(checkpoint, device=device, dtype=dtype)
    except (OSError, UserError) as err:
        given = "--checkpoint" if args.checkpoint else "the index's checkpoint"
        raise UserError(f"cannot load {given} {checkpoint}: {err}") from None
    if model.embed_dim != manifest["dim"]:
        raise UserError(
            f"dimension mismatch: {args.index} holds {manifest['dim']}-d vectors but {checkpoint} makes "
            f"{model.embed_dim}-d ones: search with the checkpoint the index was built with ({manifest['source']})"
        )
    if model.checkpoint_id != manifest["checkpoint_id"] and args.checkpoint:
        raise UserError(
            f"checkpoint mismatch: {args.index} was built with checkpoint {manifest['checkpoint_id']} "
            f"({manifest['source']}) but {checkpoint} is {model.checkpoint_id}: omit --checkpoint to use the "
            "index's, or rebuild the index with lavis-lite index checkpoint=..."
        )
    if model.checkpoint_id != manifest["checkpoint_id"]:
        raise UserError(
            f"checkpoint mismatch: {checkpoint} changed since {args.index} was built from it (checkpoint "
            f"{manifest['checkpoint_id']}, now {model.checkpoint_id}): rebuild the index with lavis-lite index"
        )
    return model, vis_processors["eval"], txt_processors["eval"]


def ranked(index: RetrievalIndex, hits: list[Hit], itm: Optional[list[float]], top_k: int) -> list[dict[str, Any]]:
    """Hits as dicts with their metadata; with ITM logits for the first len(itm), those re-ranked first
    by ITM + ITC (BLIP-2's rule), then the rest in ITC order."""
    items = index.items([h.item_id for h in hits])
    rows = [{"item_id": h.item_id, "score": h.score, "itc": h.score, "itm": None, **item} for h, item in zip(hits, items)]
    if itm is not None:
        for row, logit in zip(rows, itm):
            row.update(itm=logit, score=logit + row["itc"])
        rows[: len(itm)] = sorted(rows[: len(itm)], key=lambda r: -r["score"])
    return [{"rank": rank, **row} for rank, row in enumerate(rows[:top_k], start=1)]


def text_hits(
    index: RetrievalIndex,
    model: Blip2FeatureExtractor,
    processor: ImageProcessor,
    texts: list[str],
    top_k: int,
    rerank: int = 0,
    nprobe: Optional[int] = None,
    ef_search: Optional[int] = None,
    vectors: Optional[np.ndarray] = None,
) -> list[list[dict[str, Any]]]:
    """Text -> image: each (cleaned) text's top images, the first `rerank` re-scored by ITM (`ranked`).
    `vectors`: the texts' ITC features when they are already computed (a server batches them)."""
    vectors = model.text_vectors(texts).cpu().numpy() if vectors is None else vectors
    found = index.search(vectors, max(top_k, rerank), nprobe=nprobe, ef_search=ef_search)
    return [rank_text_hits(index, model, processor, text, hits, top_k, rerank) for text, hits in zip(texts, found)]


def rank_text_hits(
    index: RetrievalIndex, model: Blip2FeatureExtractor, processor: ImageProcessor, text: str, hits: list[Hit], top_k: int, rerank: int
) -> list[dict[str, Any]]:
    """One text query's ITC hits as `ranked` rows, the first `rerank` re-scored by ITM against their images."""
    itm = None
    if rerank:
        roots = corpus_roots(index.manifest["corpus"])
        candidates = index.items([h.item_id for h in hits[:rerank]])
        itm = []
        for batch in batched(candidates, ITM_BATCH):
            pixels = torch.stack([processor(open_item_image(item["locator"], roots)) for item in batch])
            itm += model.itm_scores(images=pixels, texts=[text] * len(batch)).tolist()
    return ranked(index, hits, itm, top_k)


def image_hits(
    index: RetrievalIndex,
    model: Blip2FeatureExtractor,
    embeds: torch.Tensor,
    top_k: int,
    rerank: int = 0,
    nprobe: Optional[int] = None,
    ef_search: Optional[int] = None,
    vectors: Optional[np.ndarray] = None,
) -> list[list[dict[str, Any]]]:
    """Image -> text: each image's (`encode_images` output) top captions, the first `rerank` re-scored by ITM."""
    vectors = model.image_vectors(image_embeds=embeds).cpu().numpy() if vectors is None else vectors
    found = index.search(vectors, max(top_k, rerank), nprobe=nprobe, ef_search=ef_search)
    return [rank_image_hits(index, model, embed, hits, top_k, rerank) for embed, hits in zip(embeds, found)]


def rank_image_hits(
    index: RetrievalIndex, model: Blip2FeatureExtractor, embed: torch.Tensor, hits: list[Hit], top_k: int, rerank: int
) -> list[dict[str, Any]]:
    """One image query's ITC hits (captions) as `ranked` rows, the first `rerank` re-scored by ITM."""
    itm = None
    if rerank:
        captions = [item["caption"] for item in index.items([h.item_id for h in hits[:rerank]])]
        itm = []
        for batch in batched(captions, ITM_BATCH):
            itm += model.itm_scores(image_embeds=embed[None], texts=batch).tolist()
    return ranked(index, hits, itm, top_k)


def search_texts(
    args: argparse.Namespace,
    index: RetrievalIndex,
    model: Blip2FeatureExtractor,
    processor: ImageProcessor,
    clean: TextCleaner,
) -> list[QueryResult]:
    """Text -> image: each text query's top images."""
    texts = [clean(q) for q in args.queries]
    empty = [q for q, t in zip(args.queries, texts) if not t]
    if empty:
        raise UserError(f"empty query: {empty[0]!r} has no words left after cleaning; give at least one word")
    found = text_hits(index, model, processor, texts, args.top_k, args.rerank, args.nprobe, args.ef_search)
    return [QueryResult(query, hits) for query, hits in zip(args.queries, found)]


def search_images(
    args: argparse.Namespace,
    index: RetrievalIndex,
    model: Blip2FeatureExtractor,
    processor: ImageProcessor,
    images: list[Image.Image],
) -> list[QueryResult]:
    """Image -> text: each query image's top captions."""
    embeds = model.encode_images(torch.stack([processor(image) for image in images]))
    found = image_hits(index, model, embeds, args.top_k, args.rerank, args.nprobe, args.ef_search)
    return [QueryResult(path, hits, image) for path, image, hits in zip(args.image, images, found)]


def hit_label(hit: dict[str, Any]) -> str:
    """What a hit is: its caption (text index) or its image's key (image index)."""
    return hit["caption"] if "caption" in hit else hit["key"]


def printable(text: str) -> str:
    """`text` with its control characters escaped (`\\x1b`), so a caption cannot drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def format_table(results: list[QueryResult], target: str) -> str:
    """Each query's hits as aligned rows: rank, score, ITC, ITM and the item (control characters escaped)."""
    lines = []
    item_header = "image  (captions)" if target == "image" else "caption  (image)"
    for result in results:
        lines += [f"query: {printable(result.query)}", f"{'rank':>4} {'score':>7} {'itc':>7} {'itm':>7}  {item_header}"]
        for hit in result.hits:
            itm = f"{hit['itm']:7.3f}" if hit["itm"] is not None else f"{'-':>7}"
            extra = printable("; ".join(hit["captions"]) if target == "image" else hit["key"])
            row = f"{hit['rank']:>4} {hit['score']:7.3f} {hit['itc']:7.3f} {itm}  {printable(hit_label(hit))}"
            lines.append(row + (f"  ({extra})" if extra else ""))
        lines.append("")
    return "\n".join(lines).rstrip()


def _card_image(locator: dict, roots: list[str]) -> tuple[bytes, list[str]]:
    """A hit's thumbnail, or a grey placeholder with a note when its image cannot be re-opened."""
    try:
        return thumbnail(open_item_image(locator, roots)), []
    except ImageError as err:
        log.warning("no thumbnail for %s: %s", describe_locator(locator), err)
        return thumbnail(Image.new("RGB", (64, 64), (200, 200, 200))), [f"image unavailable: {err}"]


def write_html(path: str, results: list[QueryResult], index: RetrievalIndex, index_path: str) -> Path:
    """A gallery page: one section per query, a card per hit (thumbnail, rank, scores, captions)."""
    roots = corpus_roots(index.manifest["corpus"])
    sections = []
    for result in results:
        cards = [GalleryItem(thumbnail(result.image), "query image", [result.query])] if result.image else []
        for hit in result.hits:
            image, notes = _card_image(hit["locator"], roots)
            itm = f", itm {hit['itm']:.3f}" if hit["itm"] is not None else ""
            scores = f"score {hit['score']:.3f} (itc {hit['itc']:.3f}{itm})"
            texts = [hit["caption"]] if "caption" in hit else hit["captions"]
            cards.append(GalleryItem(image, f"#{hit['rank']} {hit['key']}", [scores, *texts, *notes]))
        sections.append(GallerySection(result.query, cards))
    return write_sections(path, f"search results: {index_path}", sections)


def to_json(results: list[QueryResult], args: argparse.Namespace, index: RetrievalIndex) -> str:
    """The results as a JSON document (see the README for its fields)."""
    manifest = index.manifest
    document = {
        "index": args.index,
        "target": manifest["target"],
        "checkpoint_id": manifest["checkpoint_id"],
        "top_k": args.top_k,
        "rerank": args.rerank,
        "results": [{"query": r.query, "hits": r.hits} for r in results],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def main(argv: list[str] | None = None, prog: str = "lavis-lite search") -> int:
    """Search; exit status 0, or 2 with a one-line `error: ...` on stderr for bad input."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.html:
            check_writable(args.html, "--html")
        index = open_index(args.index)
        target = index.manifest["target"]
        images = check_queries(args, target)
        model, processor, clean = load_model(args, index.manifest)
        if target == "image":
            results = search_texts(args, index, model, processor, clean)
        else:
            results = search_images(args, index, model, processor, images)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_json(results, args, index) if args.json else format_table(results, target), flush=True)
    if args.html:
        print(f"gallery: {write_html(args.html, results, index, args.index)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
