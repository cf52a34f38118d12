"""Convert between our state dicts and transformers' BLIP-2 layouts.

Stage 1 <-> `Blip2ForImageTextRetrieval`; stage 2 <-> `Blip2ForConditionalGeneration`. Every conversion
renames keys by a table of prefix templates (shared by the two stages where they agree) and splits or joins
the fused Q-Former projections.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lavis_lite.config import ModelConfig, QFormerConfig, Stage2ModelConfig, VisionConfig

if TYPE_CHECKING:
    from transformers import Blip2Config, PretrainedConfig

# Our stage-1 keys that the HF retrieval layout has no place for: the ITG head and the temperature.
NOT_IN_HF = re.compile(r"^(temp|qformer\.lm_head\..*)$")
# HF Blip2ForConditionalGeneration keys that our query-only stage-2 Q-Former does not have: the text FFNs
# (`intermediate.*`, `output.*`), which only text rows pass through and stage 2 never feeds any. They are
# not carried: dropped from HF state dicts, left at HF's init when ours is loaded into HF.
HF_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")

# (ours, HF) key prefixes; "{n}" is a layer index. Order matters: the first match wins, in both directions.
# The vision tower, ln_vision and the query side of the Q-Former, as both stages hold them.
_VISION_AND_QUERIES = [
    ("ln_vision.", "vision_model.post_layernorm."),
    ("vision.trunk.", "vision_model."),
    ("qformer.embeddings.norm.", "qformer.layernorm."),
    ("qformer.layers.{n}.self_attn.out.", "qformer.encoder.layer.{n}.attention.output.dense."),
    ("qformer.layers.{n}.self_attn.norm.", "qformer.encoder.layer.{n}.attention.output.LayerNorm."),
    ("qformer.layers.{n}.cross_attn.q.", "qformer.encoder.layer.{n}.crossattention.attention.query."),
    ("qformer.layers.{n}.cross_attn.out.", "qformer.encoder.layer.{n}.crossattention.output.dense."),
    ("qformer.layers.{n}.cross_attn.norm.", "qformer.encoder.layer.{n}.crossattention.output.LayerNorm."),
    ("qformer.layers.{n}.ffn_query.fc1.", "qformer.encoder.layer.{n}.intermediate_query.dense."),
    ("qformer.layers.{n}.ffn_query.fc2.", "qformer.encoder.layer.{n}.output_query.dense."),
    ("qformer.layers.{n}.ffn_query.norm.", "qformer.encoder.layer.{n}.output_query.LayerNorm."),
    ("query_tokens", "query_tokens"),
]
# Stage 1 (`Blip2ForImageTextRetrieval`): also the text side of the Q-Former and the ITC/ITM heads.
_PREFIXES = _VISION_AND_QUERIES + [
    ("qformer.embeddings.word.", "embeddings.word_embeddings."),
    ("qformer.embeddings.position.", "embeddings.position_embeddings."),
    ("qformer.layers.{n}.ffn_text.fc1.", "qformer.encoder.layer.{n}.intermediate.dense."),
    ("qformer.layers.{n}.ffn_text.fc2.", "qformer.encoder.layer.{n}.output.dense."),
    ("qformer.layers.{n}.ffn_text.norm.", "qformer.encoder.layer.{n}.output.LayerNorm."),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("itm_head.", "itm_head."),
]
# Stage 2 (`Blip2ForConditionalGeneration`): also the projection to the LLM and the LLM itself.
_STAGE2_PREFIXES = _VISION_AND_QUERIES + [
    ("language_projection.", "language_projection."),
    ("llm.", "language_model."),
]
# Our fused projections, and the HF prefixes of their equal-sized chunks in order.
_FUSED = [
    ("qformer.layers.{n}.self_attn.qkv.", [f"qformer.encoder.layer.{{n}}.attention.attention.{p}." for p in ("query", "key", "value")]),
    ("qformer.layers.{n}.cross_attn.kv.", [f"qformer.encoder.layer.{{n}}.crossattention.attention.{p}." for p in ("key", "value")]),
]
# HF keys that are not weights of ours: the retrieval model's position-id buffer.
_HF_BUFFERS = re.compile(r"position_ids$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    """Rewrite the first matching (source, target) prefix template; None when none matches."""
    for source, target in table:
        match = _pattern(source).match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end() :]
    return None


def _to_hf(state: dict[str, Tensor], table: list[tuple[str, str]], skip: Optional[re.Pattern]) -> dict[str, Tensor]:
    """Our keys -> HF keys by `table`, fused projections split; keys matching `skip` are left out.

    Unsplit tensors are passed on as they are, so weights tied under several names stay one tensor."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if skip is not None and skip.search(key):
            continue
        for fused, parts in _FUSED:
            match = _pattern(fused).match(key)
            if match:
                for part, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                    out[part.format(**match.groupdict()) + key[match.end() :]] = chunk.clone()
                break
        else:
            new_key = _rename(key, table)
            if new_key is None:
                raise KeyError(f"no HF Blip2 name for '{key}'")
            out[new_key] = value
    return out


def _from_hf(hf_state: dict[str, Tensor], table: list[tuple[str, str]], skip: re.Pattern) -> dict[str, Tensor]:
    """HF keys -> ours by `table` read backwards, fused projections joined; keys matching `skip` are dropped."""
    out: dict[str, Tensor] = {}
    pieces: dict[str, list] = {}
    chunk_of = [(_pattern(part), fused, i, len(parts)) for fused, parts in _FUSED for i, part in enumerate(parts)]
    backwards = [(hf, mine) for mine, hf in table]
    for key, value in hf_state.items():
        if skip.search(key):
            continue
        for pattern, fused, index, count in chunk_of:
            match = pattern.match(key)
            if match:
                ours = fused.format(**match.groupdict()) + key[match.end() :]
                pieces.setdefault(ours, [None] * count)[index] = value
                break
        else:
            ours = _rename(key, backwards)
            if ours is None:
                raise KeyError(f"no lavis_lite name for HF key '{key}'")
            out[ours] = value
    for ours, parts in pieces.items():
        if any(p is None for p in parts):
            raise KeyError(f"HF state dict lacks part of '{ours}'")
        out[ours] = torch.cat(parts, dim=0)
    return out


def to_hf_retrieval(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our stage-1 state dict -> `Blip2ForImageTextRetrieval`'s (vision kind "vit" for the vision tower).

    The ITG head and the temperature have no HF counterpart and are left out (see NOT_IN_HF).
    """
    return _to_hf(state, _PREFIXES, NOT_IN_HF)


def from_hf_retrieval(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`Blip2ForImageTextRetrieval`'s state dict -> ours (without the ITG head and temperature)."""
    return _from_hf(hf_state, _PREFIXES, _HF_BUFFERS)


def to_hf_conditional_generation(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our stage-2 (`Blip2Stage2`) state dict -> `Blip2ForConditionalGeneration`'s: `llm.*` becomes
    `language_model.*`. HF's Q-Former text FFNs have no counterpart here (see HF_TEXT_FFN).

    Tied LLM weights (an output layer sharing the input embedding) stay one tensor under each of their names.
    """
    return _to_hf(state, _STAGE2_PREFIXES, None)


def from_hf_conditional_generation(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`Blip2ForConditionalGeneration`'s state dict -> our stage-2 one, without the unused Q-Former text
    FFNs (HF_TEXT_FFN)."""
    return _from_hf(hf_state, _STAGE2_PREFIXES, HF_TEXT_FFN)


def _hf_vision_qformer_configs(v: VisionConfig, q: QFormerConfig) -> dict:
    """The `Blip2Config` arguments for our vision tower (kind "vit") and Q-Former, common to both HF models.

    The Q-Former keeps its text FFNs: retrieval runs text through them, conditional generation never does.
    """
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    if v.kind != "vit":
        raise ValueError(f"HF Blip2 holds an EVA-style ViT; vision.kind='{v.kind}' has no HF layout")
    vision_config = Blip2VisionConfig(
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth,
        num_attention_heads=v.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        qkv_bias=True,
    )
    qformer_config = Blip2QFormerConfig(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=v.width,
        use_qformer_text_input=True,
    )
    return {
        "vision_config": vision_config.to_dict(),
        "qformer_config": qformer_config.to_dict(),
        "num_query_tokens": q.num_query_tokens,
    }


def hf_retrieval_config(cfg: ModelConfig) -> Blip2Config:
    """A transformers `Blip2Config` for `Blip2ForImageTextRetrieval` with our (vision kind "vit") shapes."""
    from transformers import Blip2Config

    return Blip2Config(
        **_hf_vision_qformer_configs(cfg.vision, cfg.qformer),
        image_text_hidden_size=cfg.embed_dim,
        image_token_index=None,
    )


def hf_conditional_generation_config(
    cfg: Stage2ModelConfig, text_config: PretrainedConfig, image_token_index: int
) -> Blip2Config:
    """A transformers `Blip2Config` for `Blip2ForConditionalGeneration` with our (vision kind "vit") shapes.

    `text_config`: the LLM's transformers config (decoder-only, e.g. OPT, or encoder-decoder, e.g. T5).
    `image_token_index`: a token id of the LLM's vocabulary that HF's `input_ids` carry at the query
    positions (HF puts the soft prompts there); it must not occur in the text.
    """
    from transformers import Blip2Config

    return Blip2Config(
        **_hf_vision_qformer_configs(cfg.vision, cfg.qformer),
        text_config=text_config.to_dict(),
        image_token_index=image_token_index,
    )
