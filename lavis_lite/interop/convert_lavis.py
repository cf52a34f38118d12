"""Convert between LAVIS's BLIP-2 checkpoints and ours, both ways.

    blip2_pretrained.pth            stage 1 (`Blip2Qformer`): Q-Former, queries, ln_vision, ITC/ITM/ITG heads, temp
    blip2_pretrained_opt2.7b.pth    stage 2 (`Blip2OPT`): the query side of the Q-Former, queries, ln_vision, opt_proj
    blip2_pretrained_flant5xl.pth   stage 2 (`Blip2T5`): the same with t5_proj
    eva_vit_g.pth                   LAVIS's EVA ViT-g (40 blocks; LAVIS builds 39 and drops the final norm)

LAVIS's keys are first renamed to transformers' BLIP-2 names, as transformers' own
`convert_blip_2_original_to_pytorch.py` does, and from there by `convert_hf`, which also joins LAVIS's
separate query / key / value projections into our fused ones. What transformers has no place for is mapped
here directly: the ITG head (`Qformer.cls.predictions`, whose decoder is tied to the word embeddings) and the
temperature. A key that maps nowhere is an error that names it: nothing is dropped without a rule.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from lavis_lite.checkpoint import read_state_dict
from lavis_lite.config import ConfigError
from lavis_lite.interop.convert_hf import _PREFIXES, _STAGE2_PREFIXES, _from_hf, _pattern, _rename, _to_hf

log = logging.getLogger("lavis_lite.interop")

# (LAVIS, HF) key prefix templates; "{n}" is a layer index. The first match wins, in both directions.
_LAVIS_HF = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.{n}.norm1.", "vision_model.encoder.layers.{n}.layer_norm1."),
    ("visual_encoder.blocks.{n}.norm2.", "vision_model.encoder.layers.{n}.layer_norm2."),
    ("visual_encoder.blocks.{n}.attn.proj.", "vision_model.encoder.layers.{n}.self_attn.projection."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
    ("ln_vision.", "vision_model.post_layernorm."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("Qformer.bert.encoder.layer.{n}.attention.self.", "qformer.encoder.layer.{n}.attention.attention."),
    ("Qformer.bert.encoder.layer.{n}.crossattention.self.", "qformer.encoder.layer.{n}.crossattention.attention."),
    ("Qformer.bert.encoder.", "qformer.encoder."),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("itm_head.", "itm_head."),
    ("query_tokens", "query_tokens"),
]
# Stage 2: the projection and the LLM are named after the LLM's family.
_LLM_PREFIXES = {"opt": ("opt_proj.", "opt_model."), "t5": ("t5_proj.", "t5_model.")}
# (ours, LAVIS) for what transformers' BLIP-2 has no place for.
_DIRECT = [
    ("qformer.lm_head.dense.", "Qformer.cls.predictions.transform.dense."),
    ("qformer.lm_head.norm.", "Qformer.cls.predictions.transform.LayerNorm."),
    ("qformer.lm_head.bias", "Qformer.cls.predictions.bias"),
    ("temp", "temp"),
]
# LAVIS keys that repeat another tensor (BERT ties the ITG decoder to the word embeddings and its bias).
_TIED = {
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}
_BUFFERS = re.compile(r"position_ids$")  # BERT's position-id buffer: not a weight
# EVA's attention has a query and a value bias and no key bias; ours (and transformers') one fused qkv bias.
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(?P<n>\d+)\.attn\.(?P<part>[qv])_bias$")
_QKV_BIAS = "vision_model.encoder.layers.{n}.self_attn.qkv.bias"
# eva_vit_g.pth parts LAVIS builds no module for: the blocks after the ones it runs and the final norm / head.
_EVA_UNUSED = re.compile(r"^(norm|fc_norm|head|lm_head)\.")


def _llm_tables(llm: str) -> list[tuple[str, str]]:
    if llm not in _LLM_PREFIXES:
        raise ConfigError(f"LAVIS stage-2 checkpoints hold an OPT or a T5 model: llm must be 'opt' or 't5', not {llm!r}")
    proj, model = _LLM_PREFIXES[llm]
    return [(proj, "language_projection."), (model, "language_model.")]


def _checked_tied(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    state = dict(state)
    for copy, original in _TIED.items():
        if copy in state:
            if original in state and state[copy] is not state[original] and not torch.equal(state[copy], state[original]):
                raise ConfigError(f"{source}: {copy} differs from {original}, which LAVIS ties it to: not a LAVIS BLIP-2 checkpoint")
            del state[copy]
    return state


def from_lavis(state: dict[str, Tensor], stage: int = 1, source: str = "LAVIS checkpoint") -> dict[str, Tensor]:
    """A LAVIS state dict (stage 1 `Blip2Qformer`, or stage 2 `Blip2OPT` / `Blip2T5`) in our names.

    ConfigError listing the keys that map nowhere, or tied copies that differ."""
    state = _checked_tied({k: v for k, v in state.items() if not _BUFFERS.search(k)}, source)
    table = _LAVIS_HF + (_llm_tables("opt") + _llm_tables("t5") if stage == 2 else [])
    out, hf, unknown, qv = {}, {}, [], {}
    backwards = [(lavis, ours) for ours, lavis in _DIRECT]
    for key, value in state.items():
        bias = _QV_BIAS.match(key)
        if bias:
            qv.setdefault(bias["n"], {})[bias["part"]] = value
            continue
        direct = _rename(key, backwards)
        if direct is not None:
            out[direct] = value
            continue
        hf_key = _rename(key, table)
        if hf_key is None:
            unknown.append(key)
        else:
            hf[hf_key] = value
    for n, parts in qv.items():
        if set(parts) != {"q", "v"}:
            raise ConfigError(f"{source}: visual_encoder.blocks.{n}.attn has a q_bias or a v_bias without the other")
        hf[_QKV_BIAS.format(n=n)] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
    if stage == 2 and sum(any(k.startswith(p) for k in state) for p in ("opt_proj.", "t5_proj.")) > 1:
        raise ConfigError(f"{source} holds both opt_proj and t5_proj: not one LAVIS stage-2 model")
    try:
        out.update(_from_hf(hf, _PREFIXES if stage == 1 else _STAGE2_PREFIXES, _BUFFERS))
    except KeyError as err:
        unknown.append(str(err.args[0]))
    if unknown:
        raise ConfigError(f"{source}: {len(unknown)} keys map to nothing in a stage-{stage} model: {sorted(unknown)[:10]}")
    return out


def to_lavis(state: dict[str, Tensor], stage: int = 1, llm: str = "opt") -> dict[str, Tensor]:
    """Our stage-1 or stage-2 state dict in LAVIS's names (stage 2: `llm` "opt" or "t5" names the projection);
    the ITG decoder's tied copies are written as LAVIS's state dicts hold them."""
    direct = {k: v for k, v in state.items() if _rename(k, _DIRECT) is not None}
    hf = _to_hf({k: v for k, v in state.items() if k not in direct}, _PREFIXES if stage == 1 else _STAGE2_PREFIXES, None)
    backwards = [(h, lavis) for lavis, h in _LAVIS_HF + (_llm_tables(llm) if stage == 2 else [])]
    out = {_rename(k, _DIRECT): v for k, v in direct.items()}
    qkv_bias = _pattern(_QKV_BIAS)
    for key, value in hf.items():
        bias = qkv_bias.match(key)
        if bias and len(key) == bias.end():
            q, k, v = value.chunk(3)
            if not k.is_meta and torch.any(k != 0):
                raise ConfigError(f"{key}: the key bias is not zero, and LAVIS's EVA attention has none")
            out[f"visual_encoder.blocks.{bias['n']}.attn.q_bias"], out[f"visual_encoder.blocks.{bias['n']}.attn.v_bias"] = q, v
            continue
        lavis = _rename(key, backwards)
        if lavis is None:
            raise KeyError(f"no LAVIS name for '{key}'")
        out[lavis] = value
    for copy, original in _TIED.items():
        if original in out:
            out[copy] = out[original]
    return out


def from_lavis_eva(state: dict[str, Tensor], depth: int, source: str = "EVA ViT checkpoint") -> dict[str, Tensor]:
    """LAVIS's `eva_vit_g.pth` (keys without `visual_encoder.`) as our `vision.trunk.*` keys, keeping the first
    `depth` blocks as LAVIS does (39 of ViT-g's 40) and, like LAVIS, no final norm or head."""
    kept, dropped = {}, []
    block = _pattern("blocks.{n}.")
    for key, value in state.items():
        match = block.match(key)
        if _EVA_UNUSED.match(key) or (match and int(match["n"]) >= depth):
            dropped.append(key)
        else:
            kept[f"visual_encoder.{key}"] = value
    if dropped:
        log.info("%s: %d tensors of blocks >= %d and the final norm / head left out, as LAVIS does", source, len(dropped), depth)
    return from_lavis(kept, 1, source)


def load_lavis_weights(model: nn.Module, path: str | Path, stage: int = 1) -> None:
    """Load a LAVIS `.pth` into our stage-1 or stage-2 model: every tensor the file holds must land on a
    parameter of the same shape, and every trainable part must be in the file (the frozen image encoder and
    LLM may be absent: LAVIS ships them apart). ConfigError listing what does not fit."""
    converted = from_lavis(read_state_dict(path, "LAVIS checkpoint"), stage, str(path))
    _load_exact(model, converted, str(path), optional=("vision.", "llm."))


def load_lavis_eva_weights(model: nn.Module, path: str | Path) -> None:
    """Load LAVIS's EVA ViT-g weights (`eva_vit_g.pth`) into the frozen image encoder (vision.kind "vit")."""
    if getattr(getattr(model, "cfg", None), "vision", None) is None or model.cfg.vision.kind != "vit":
        raise ConfigError(f"{path}: LAVIS's EVA ViT loads into vision.kind=vit (configs/model/blip2-lavis-vitg.yaml)")
    converted = from_lavis_eva(read_state_dict(path, "EVA ViT checkpoint"), model.cfg.vision.depth, str(path))
    _load_exact(model, converted, str(path), only="vision.")


def _load_exact(model: nn.Module, state: dict[str, Tensor], source: str, optional: tuple[str, ...] = (), only: Optional[str] = None) -> None:
    own = model.state_dict()
    present = tuple(p for p in optional if any(k.startswith(p) for k in state))  # an optional part given is whole
    wanted = {
        k for k in own
        if (only is None or k.startswith(only)) and (not k.startswith(optional) or k.startswith(present))
    }
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{source} does not fit this model: {len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected "
            f"{unexpected[:6]}, {len(shapes)} of another shape {shapes[:4]}"
        )
    model.load_state_dict(state, strict=False)
