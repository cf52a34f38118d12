"""`lavis-lite`: one command whose subcommands are the training, captioning and retrieval programs.

    lavis-lite train-stage1 --config stage1/demo train.steps=100
    lavis-lite train-stage2 --config configs/stage2/paper-opt2.7b.yaml
    lavis-lite caption --checkpoint runs/stage2-demo photo.jpg
    lavis-lite index --config retrieval/demo
    lavis-lite search --index runs/retrieval-demo/index "a red circle"
    lavis-lite evaluate --checkpoint runs/stage1-demo --shards data/synthetic/val
    lavis-lite convert --from lavis --to hf --model blip2-lavis-vitg blip2_pretrained.pth blip2-hf

Each subcommand has `--help`; `python -m stage1.train` and the like run the same programs from a checkout.
"""

from __future__ import annotations

import sys
from importlib import import_module

# subcommand -> (module under lavis_lite, what it does)
COMMANDS = {
    "train-stage1": ("stage1.train", "train the Q-Former against the frozen image encoder (ITC, ITM, ITG)"),
    "train-stage2": ("stage2.train", "bridge a stage-1 Q-Former to a frozen LLM and train it to caption"),
    "caption": ("stage2.caption", "caption image files with a stage-2 model"),
    "index": ("retrieval.build", "embed a corpus and build a FAISS index"),
    "search": ("retrieval.search", "search an index by text or image, optionally with ITM re-ranking"),
    "evaluate": ("retrieval.evaluate", "held-out retrieval recall of a stage-1 model"),
    "embed": ("retrieval.embed", "embed a corpus into files (clip-retrieval's layout), partition by partition"),
    "serve": ("retrieval.serve", "serve indexes over HTTP: clip-retrieval's API, ITM re-ranking, a search page"),
    "convert": ("interop.convert", "convert weights between ours, LAVIS's .pth files and Hugging Face directories"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: lavis-lite <command> [--help] [args ...]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}': use one of {', '.join(COMMANDS)} (lavis-lite --help)", file=sys.stderr)
        return 2
    module = import_module(f"lavis_lite.{COMMANDS[argv[0]][0]}")
    return module.main(argv[1:], prog=f"lavis-lite {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
