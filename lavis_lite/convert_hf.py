"""Convert between our stage-1 state dict and transformers' `Blip2ForImageTextRetrieval` layout."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .config import ModelConfig

# Our keys that the HF retrieval layout has no place for: the ITG head and the temperature.
NOT_IN_HF = re.compile(r"^(temp|qformer\.lm_head\..*)$")

# (ours, HF) key prefixes; "{n}" is a layer index. Order matters: the first match wins, in both directions.
_PREFIXES = [
    ("ln_vision.", "vision_model.post_layernorm."),
    ("vision.trunk.", "vision_model."),
    ("qformer.embeddings.word.", "embeddings.word_embeddings."),
    ("qformer.embeddings.position.", "embeddings.position_embeddings."),
    ("qformer.embeddings.norm.", "qformer.layernorm."),
    ("qformer.layers.{n}.self_attn.out.", "qformer.encoder.layer.{n}.attention.output.dense."),
    ("qformer.layers.{n}.self_attn.norm.", "qformer.encoder.layer.{n}.attention.output.LayerNorm."),
    ("qformer.layers.{n}.cross_attn.q.", "qformer.encoder.layer.{n}.crossattention.attention.query."),
    ("qformer.layers.{n}.cross_attn.out.", "qformer.encoder.layer.{n}.crossattention.output.dense."),
    ("qformer.layers.{n}.cross_attn.norm.", "qformer.encoder.layer.{n}.crossattention.output.LayerNorm."),
    ("qformer.layers.{n}.ffn_text.fc1.", "qformer.encoder.layer.{n}.intermediate.dense."),
    ("qformer.layers.{n}.ffn_text.fc2.", "qformer.encoder.layer.{n}.output.dense."),
    ("qformer.layers.{n}.ffn_text.norm.", "qformer.encoder.layer.{n}.output.LayerNorm."),
    ("qformer.layers.{n}.ffn_query.fc1.", "qformer.encoder.layer.{n}.intermediate_query.dense."),
    ("qformer.layers.{n}.ffn_query.fc2.", "qformer.encoder.layer.{n}.output_query.dense."),
    ("qformer.layers.{n}.ffn_query.norm.", "qformer.encoder.layer.{n}.output_query.LayerNorm."),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("itm_head.", "itm_head."),
    ("query_tokens", "query_tokens"),
]
# Our fused projections, and the HF prefixes of their equal-sized chunks in order.
_FUSED = [
    ("qformer.layers.{n}.self_attn.qkv.", [f"qformer.encoder.layer.{{n}}.attention.attention.{p}." for p in ("query", "key", "value")]),
    ("qformer.layers.{n}.cross_attn.kv.", [f"qformer.encoder.layer.{{n}}.crossattention.attention.{p}." for p in ("key", "value")]),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    """Rewrite the first matching (source, target) prefix template; None when none matches."""
    for source, target in table:
        match = _pattern(source).match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end() :]
    return None


def to_hf_retrieval(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our stage-1 state dict -> `Blip2ForImageTextRetrieval`'s (vision kind "vit" for the vision tower).

    The ITG head and the temperature have no HF counterpart and are left out (see NOT_IN_HF).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if NOT_IN_HF.match(key):
            continue
        for fused, parts in _FUSED:
            match = _pattern(fused).match(key)
            if match:
                for part, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                    out[part.format(**match.groupdict()) + key[match.end() :]] = chunk.clone()
                break
        else:
            new_key = _rename(key, _PREFIXES)
            if new_key is None:
                raise KeyError(f"no HF Blip2 name for '{key}'")
            out[new_key] = value
    return out


def from_hf_retrieval(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`Blip2ForImageTextRetrieval`'s state dict -> ours (without the ITG head and temperature)."""
    out: dict[str, Tensor] = {}
    pieces: dict[str, list] = {}
    chunk_of = [(_pattern(part), fused, i, len(parts)) for fused, parts in _FUSED for i, part in enumerate(parts)]
    for key, value in hf_state.items():
        if key.endswith("position_ids"):
            continue
        for pattern, fused, index, count in chunk_of:
            match = pattern.match(key)
            if match:
                ours = fused.format(**match.groupdict()) + key[match.end() :]
                pieces.setdefault(ours, [None] * count)[index] = value
                break
        else:
            ours = _rename(key, [(hf, mine) for mine, hf in _PREFIXES])
            if ours is None:
                raise KeyError(f"no lavis_lite name for HF key '{key}'")
            out[ours] = value
    for ours, parts in pieces.items():
        if any(p is None for p in parts):
            raise KeyError(f"HF state dict lacks part of '{ours}'")
        out[ours] = torch.cat(parts, dim=0)
    return out


def hf_retrieval_config(cfg: ModelConfig):
    """A transformers `Blip2Config` for `Blip2ForImageTextRetrieval` with our (vision kind "vit") shapes."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    v, q = cfg.vision, cfg.qformer
    if v.kind != "vit":
        raise ValueError(f"HF Blip2 holds an EVA-style ViT; vision.kind='{v.kind}' has no HF layout")
    vision = Blip2VisionConfig(
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth,
        num_attention_heads=v.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
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
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_text_hidden_size=cfg.embed_dim,
        image_token_index=None,
    )
