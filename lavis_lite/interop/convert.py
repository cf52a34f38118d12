"""`lavis-lite convert`: a BLIP-2 model from one layout to another: ours, LAVIS's `.pth`, Hugging Face's directory.

examples:
  lavis-lite convert --from lavis --to ours --model blip2-lavis-vitg weights/blip2_pretrained.pth runs/blip2-lavis \\
      vision.checkpoint=weights/eva_vit_g.pth qformer.tokenizer=weights/bert-base-uncased
  lavis-lite convert --from ours --to hf runs/stage1-paper runs/stage1-paper-hf
  lavis-lite convert --from hf --to lavis weights/blip2-itm-vit-g runs/blip2_itm.pth
  lavis-lite convert --from ours --to lavis --llm opt runs/stage2-opt runs/blip2_opt.pth

ours: a run or checkpoint directory (read), or a directory written with the trained weights, the frozen image
encoder's weights and the config (write: `model.safetensors`, `vision.safetensors`, `config.yaml`; load it with
`load_stage1_checkpoint` / `load_stage2_checkpoint`). lavis: a `.pth` of LAVIS's keys, `{"model": ...}`;
reading one needs the architecture (`--model`, a config name or YAML, plus KEY=VALUE overrides: LAVIS's files
hold weights, not shapes). hf: a transformers `Blip2ForImageTextRetrieval` or `Blip2ForConditionalGeneration`
directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from lavis_lite.checkpoint import CONFIG, WEIGHTS, resolve_checkpoint, trainable_state_dict
from lavis_lite.config import ConfigError, Stage2ModelConfig, to_dict
from lavis_lite.errors import CommandParser, UserError
from lavis_lite.interop.convert_lavis import to_lavis
from lavis_lite.interop.hf_pretrained import from_pretrained, save_pretrained
from lavis_lite.io import atomic_path, check_writable, replace_dir, staging_dir

LAYOUTS = ("ours", "lavis", "hf")
VISION_WEIGHTS = "vision.safetensors"


def build_parser(prog: str = "lavis-lite convert") -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=LAYOUTS, required=True, help="layout of SRC")
    parser.add_argument("--to", dest="target", choices=LAYOUTS, required=True, help="layout to write DST in")
    parser.add_argument("src", metavar="SRC", help="the model to convert")
    parser.add_argument("dst", metavar="DST", help="where to write it (a .pth file for lavis, a directory otherwise)")
    parser.add_argument("--model", help="--from lavis: the architecture, a model config name or YAML (e.g. blip2-lavis-vitg)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="--from lavis: a stage-1 or a stage-2 file (default 1)")
    parser.add_argument("--llm", choices=("opt", "t5"), help="--to lavis, stage 2: name the projection opt_proj or t5_proj (default: from the LLM)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="--from lavis: overrides of the --model config")
    return parser


def read(layout: str, src: str, args: argparse.Namespace):
    """(model, tokenizer or None) from SRC in `layout`."""
    from lavis_lite.models.factory import create_model, create_stage2_model, load_stage1_checkpoint, load_stage2_checkpoint

    if layout == "hf":
        loaded = from_pretrained(src)
        return loaded if isinstance(loaded, tuple) else (loaded, None)
    if layout == "ours":
        path = resolve_checkpoint(src)
        model_cfg = OmegaConf.load(path / CONFIG).get("model") if (path / CONFIG).is_file() else None
        if model_cfg is not None and "llm" in model_cfg:
            return load_stage2_checkpoint(path), None
        return load_stage1_checkpoint(path)
    if not args.model:
        raise ConfigError("--from lavis needs --model: the architecture of the file (e.g. blip2-lavis-vitg), as LAVIS's .pth holds no shapes")
    overrides = [*args.overrides, f"lavis_checkpoint={src}", "qformer.bert=null"]
    if args.stage == 2:
        return create_stage2_model(args.model, overrides), None
    return create_model(args.model, overrides)


def write_ours(model, dst: Path) -> Path:
    """Trained weights, the frozen encoder's weights and a config that reads them, as one directory."""
    cfg = to_dict(model.cfg)
    tmp = staging_dir(dst)
    save_file(trainable_state_dict(model), str(tmp / WEIGHTS))
    vision = {k: v.contiguous() for k, v in model.vision.trunk.state_dict().items()}
    save_file(vision, str(tmp / VISION_WEIGHTS))
    cfg["vision"]["checkpoint"] = str((dst / VISION_WEIGHTS).resolve())
    if "llm" in cfg and not Path(cfg["llm"]["path"] or "").exists():  # an LLM that came inside the source
        model.llm.save_pretrained(tmp / "llm")
        model.tokenizer.save_pretrained(tmp / "llm")
        cfg["llm"]["path"] = str((dst / "llm").resolve())
    for key in ("lavis_checkpoint", "stage1_checkpoint"):
        cfg.pop(key, None)
    cfg.get("qformer", {})["bert"] = None
    (tmp / CONFIG).write_text(OmegaConf.to_yaml({"model": cfg}))
    replace_dir(tmp, dst)
    return dst


def convert(args: argparse.Namespace) -> Path:
    dst = Path(args.dst)
    check_writable(dst, "DST", directory=args.target != "lavis")
    model, tokenizer = read(args.source, args.src, args)
    stage = 2 if isinstance(model.cfg, Stage2ModelConfig) else 1
    if args.target == "hf":
        return save_pretrained(model, dst, tokenizer)
    if args.target == "ours":
        return write_ours(model, dst)
    llm = args.llm or ("t5" if stage == 2 and model.is_encoder_decoder else "opt")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}  # LAVIS ships the LLM apart
    if model.cfg.vision.kind != "vit":
        logging.getLogger("lavis_lite.interop").warning(
            "LAVIS's BLIP-2 runs an EVA ViT, not vision.kind=%s: %s holds the Q-Former side only", model.cfg.vision.kind, dst)
        state = {k: v for k, v in state.items() if not k.startswith("vision.")}
    with atomic_path(dst) as tmp:
        torch.save({"model": to_lavis(state, stage=stage, llm=llm)}, tmp)
    return dst


def main(argv: list[str] | None = None, prog: str = "lavis-lite convert") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.source == args.target and args.source != "ours":
        print(f"error: --from and --to are both {args.source}: nothing to convert", file=sys.stderr)
        return 2
    try:
        out = convert(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
