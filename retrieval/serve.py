"""Serve retrieval indexes over HTTP: clip-retrieval's API (its `ClipClient` works unchanged), ITM re-ranking,
image -> text, Prometheus metrics and a search page at `/`.

Indexes are named on the command line (`--index NAME=DIR`, repeatable) or in a JSON / YAML file
(`--indices FILE`) mapping each name to an index directory, or to `{image: DIR, text: DIR}` for an image
index (searched by text) and a text index (searched by images) under one name, as clip-retrieval's
`indices_paths.json` does. Every index must come from the same stage-1 checkpoint: the model is loaded once.

examples:
  lavis-lite serve --index demo=runs/retrieval-demo/index
  lavis-lite serve --indices indices.yaml --host 0.0.0.0 --port 1234
  curl -s localhost:1234/knn-service -d '{"text": "a red circle", "modality": "image", "num_images": 5, "indice_name": "demo"}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from lavis_lite.errors import CommandParser, UserError

from .search import add_placement_arguments, int_at_least, load_model, open_index
from .service import ServiceConfig, Served, create_app

log = logging.getLogger("lavis_lite.retrieval")


def build_parser(prog: str = "lavis-lite serve") -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", action="append", default=[], metavar="NAME=DIR", help="an index to serve under NAME (repeatable)")
    parser.add_argument("--indices", metavar="FILE", help="a JSON / YAML file: {name: DIR} or {name: {image: DIR, text: DIR}}")
    parser.add_argument("--checkpoint", metavar="DIR", help="stage-1 run or checkpoint (default: the one the indexes were built with)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int_at_least(1), default=1234, help="port (default: 1234, clip-retrieval's)")
    parser.add_argument("--max-batch", type=int_at_least(1), default=16, help="queries per encoder batch at most (default: 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="how long a query waits for others to batch with (default: 0: it batches with those that "
                             "queued while the encoder was busy)")
    add_placement_arguments(parser)
    return parser


def index_paths(args: argparse.Namespace) -> dict[str, Any]:
    """name -> DIR or {image: DIR, text: DIR}, from --indices and --index."""
    paths: dict[str, Any] = {}
    if args.indices:
        path = Path(args.indices)
        if not path.is_file():
            raise UserError(f"--indices {path} not found: give a JSON or YAML file mapping names to index directories")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"--indices {path} is not valid JSON / YAML ({type(err).__name__}): fix the file") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, (str, dict)) for v in loaded.values()):
            raise UserError(f"--indices {path} must map each name to a directory or to {{image: DIR, text: DIR}}")
        paths.update(loaded)
    for item in args.index:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise UserError(f"--index {item!r} is not NAME=DIR (e.g. --index demo=runs/retrieval-demo/index)")
        paths[name] = directory
    if not paths:
        raise UserError("no index to serve: give --index NAME=DIR or --indices FILE")
    return paths


def load_served(paths: dict[str, Any]) -> dict[str, Served]:
    """Every index opened, grouped by name and modality (the kind of item it holds)."""
    served = {}
    for name, spec in paths.items():
        dirs = spec if isinstance(spec, dict) else {None: spec}
        unknown = sorted(set(dirs) - {None, "image", "text"})
        if unknown:
            raise UserError(f"index {name!r}: unknown keys {unknown}: use image and text")
        indexes, where = {}, {}
        for modality, directory in dirs.items():
            index = open_index(str(directory))
            target = index.manifest["target"]
            if modality is not None and modality != target:
                raise UserError(f"index {name!r}: {directory} indexes {target}s, listed as {modality}")
            indexes[target], where[target] = index, str(directory)
        served[name] = Served(name, indexes, where)
    ids = {(e.name, m): i.manifest["checkpoint_id"] for e in served.values() for m, i in e.indexes.items()}
    if len(set(ids.values())) > 1:
        raise UserError(f"the indexes come from different checkpoints ({ids}): serve each checkpoint's indexes apart")
    return served


def main(argv: list[str] | None = None, prog: str = "lavis-lite serve") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        served = load_served(index_paths(args))
        first = next(iter(served.values()))
        modality, index = next(iter(first.indexes.items()))
        model_args = SimpleNamespace(checkpoint=args.checkpoint, index=first.paths[modality], device=args.device, precision=args.precision)
        model, processor, clean = load_model(model_args, index.manifest)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(model, processor, clean, served, ServiceConfig(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms))
    print(f"serving {', '.join(served)} at http://{args.host}:{args.port}/ (API: /docs)", flush=True)
    log.info("indexes: %s", json.dumps({n: e.paths for n, e in served.items()}))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
