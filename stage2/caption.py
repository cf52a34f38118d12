"""Caption images (or answer a question about them) with a trained stage-2 model.

Prints one line per image, `path<TAB>caption`, in the order given. The checkpoint is a stage-2 run directory
(its latest checkpoint) or one of its checkpoints/step-N directories; the LLM is loaded from the llm.path
its config.yaml names.

examples:
  lavis-lite caption --checkpoint runs/stage2 photo1.png photo2.jpg
  lavis-lite caption --checkpoint runs/stage2 --prompt "Question: what colour is the circle? Answer:" a.png
"""

from __future__ import annotations

import argparse
import sys

from lavis_lite.errors import CommandParser, UserError
from lavis_lite.inference.preprocess import ImageError, caption_images, open_image
from lavis_lite.models.factory import load_stage2_checkpoint
from lavis_lite.models.stage2_model import Blip2Stage2
from lavis_lite.precision import resolve_device


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(prog: str = "lavis-lite caption") -> argparse.ArgumentParser:
    """The command line: --checkpoint DIR, the images and the generation settings."""
    parser = CommandParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="stage-2 run or checkpoint directory")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--prompt", metavar="TEXT", help="text after the image (default: the model's prompt)")
    parser.add_argument("--num-beams", type=positive_int, default=5, metavar="N", help="beam width (default: 5)")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=30, metavar="N", help="longest caption, in tokens (default: 30)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (default: 16)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where available, else cpu")
    parser.add_argument("--llm", metavar="PATH", help="the LLM (directory or .gguf) when it moved since training")
    return parser


def load(args: argparse.Namespace) -> Blip2Stage2:
    """The model, once every image file opens; ValueError (ImageError, ConfigError) naming any problem."""
    if not args.images:
        raise ImageError("no images given: list one or more image files after the options")
    for path in args.images:  # every file is checked before the (slow) model load
        open_image(path).close()
    device = resolve_device(args.device)
    try:
        overrides = [f"llm.path={args.llm}"] if args.llm else []
        return load_stage2_checkpoint(args.checkpoint, overrides, device=device)
    except (OSError, UserError) as err:  # the file system's answer about the user's path, or ours
        raise UserError(f"cannot load --checkpoint {args.checkpoint}: {err}") from None


def main(argv: list[str] | None = None, prog: str = "lavis-lite caption") -> int:
    """Caption the images; exit status 0, or 2 with `error: ...` on stderr for a bad checkpoint or image."""
    args = build_parser(prog).parse_args(argv)
    try:
        model = load(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        captions = caption_images(model, paths, prompt=args.prompt, batch_size=len(paths), **settings)
        for path, caption in zip(paths, captions):
            print(f"{path}\t{' '.join(caption.split())}", flush=True)  # one line, whatever the LLM wrote
    return 0


if __name__ == "__main__":
    sys.exit(main())
