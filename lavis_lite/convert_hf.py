"""Convert between our stage-1 state dict and transformers' `Blip2ForImageTextRetrieval` layout."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .config import ModelConfig

# Our keys that the HF retrieval layout has no place for: the ITG head and the temperature.
NOT_IN_HF = re.compile(r"^(temp|qformer\.lm_head\..*)$")

_RENAMES = [  # (ours, HF), applied as prefix/regex rewrites; fused projections are handled below
    (r"^vision\.trunk\.", "vision_model."),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^qformer\.embeddings\.word\.", "embeddings.word_embeddings."),
    (r"^qformer\.embeddings\.position\.", "embeddings.position_embeddings."),
    (r"^qformer\.embeddings\.norm\.", "qformer.layernorm."),
    (r"^qformer\.layers\.(\d+)\.self_attn\.out\.", r"qformer.encoder.layer.\1.attention.output.dense."),
    (r"^qformer\.layers\.(\d+)\.self_attn\.norm\.", r"qformer.encoder.layer.\1.attention.output.LayerNorm."),
    (r"^qformer\.layers\.(\d+)\.cross_attn\.q\.", r"qformer.encoder.layer.\1.crossattention.attention.query."),
    (r"^qformer\.layers\.(\d+)\.cross_attn\.out\.", r"qformer.encoder.layer.\1.crossattention.output.dense."),
    (r"^qformer\.layers\.(\d+)\.cross_attn\.norm\.", r"qformer.encoder.layer.\1.crossattention.output.LayerNorm."),
    (r"^qformer\.layers\.(\d+)\.ffn_text\.fc1\.", r"qformer.encoder.layer.\1.intermediate.dense."),
    (r"^qformer\.layers\.(\d+)\.ffn_text\.fc2\.", r"qformer.encoder.layer.\1.output.dense."),
    (r"^qformer\.layers\.(\d+)\.ffn_text\.norm\.", r"qformer.encoder.layer.\1.output.LayerNorm."),
    (r"^qformer\.layers\.(\d+)\.ffn_query\.fc1\.", r"qformer.encoder.layer.\1.intermediate_query.dense."),
    (r"^qformer\.layers\.(\d+)\.ffn_query\.fc2\.", r"qformer.encoder.layer.\1.output_query.dense."),
    (r"^qformer\.layers\.(\d+)\.ffn_query\.norm\.", r"qformer.encoder.layer.\1.output_query.LayerNorm."),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
    (r"^(itm_head|query_tokens)", r"\1"),
]
# Fused projections: ours -> the HF names of its equal-sized chunks, in order.
_FUSED = [
    (r"^qformer\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)$", r"qformer.encoder.layer.\1.attention.attention.{}.\2", ("query", "key", "value")),
    (r"^qformer\.layers\.(\d+)\.cross_attn\.kv\.(weight|bias)$", r"qformer.encoder.layer.\1.crossattention.attention.{}.\2", ("key", "value")),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in table:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def to_hf_retrieval(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our stage-1 state dict -> `Blip2ForImageTextRetrieval`'s (vision kind "vit" for the vision tower).

    The ITG head and the temperature have no HF counterpart and are left out (see NOT_IN_HF).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if NOT_IN_HF.match(key):
            continue
        for pattern, template, parts in _FUSED:
            match = re.match(pattern, key)
            if match:
                for name, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                    out[match.expand(template).format(name)] = chunk.clone()
                break
        else:
            new_key = _rename(key, _RENAMES)
            if new_key is None:
                raise KeyError(f"no HF Blip2 name for '{key}'")
            out[new_key] = value
    return out


def from_hf_retrieval(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`Blip2ForImageTextRetrieval`'s state dict -> ours (without the ITG head and temperature)."""
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        if key.endswith("position_ids"):
            continue
        fused = _hf_fused_target(key)
        if fused is not None:
            ours, part = fused
            pending.setdefault(ours, {})[part] = value
            continue
        ours = _rename(key, _HF_RENAMES)
        if ours is None:
            raise KeyError(f"no lavis_lite name for HF key '{key}'")
        out[ours] = value
    for ours, parts in pending.items():
        order = ("query", "key", "value") if ".self_attn." in ours else ("key", "value")
        missing = [p for p in order if p not in parts]
        if missing:
            raise KeyError(f"HF state dict lacks the {missing} part(s) of '{ours}'")
        out[ours] = torch.cat([parts[p] for p in order], dim=0)
    return out


def _hf_fused_target(key: str) -> tuple[str, str] | None:
    match = re.match(r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)$", key)
    if not match:
        return None
    layer, block, part, kind = match.groups()
    if block == "attention":
        return f"qformer.layers.{layer}.self_attn.qkv.{kind}", part
    if part == "query":
        return None
    return f"qformer.layers.{layer}.cross_attn.kv.{kind}", part


_HF_RENAMES = [
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
    (r"^vision_model\.", "vision.trunk."),
    (r"^embeddings\.word_embeddings\.", "qformer.embeddings.word."),
    (r"^embeddings\.position_embeddings\.", "qformer.embeddings.position."),
    (r"^qformer\.layernorm\.", "qformer.embeddings.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"qformer.layers.\1.self_attn.out."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_attn.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.query\.", r"qformer.layers.\1.cross_attn.q."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"qformer.layers.\1.cross_attn.out."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"qformer.layers.\1.cross_attn.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"qformer.layers.\1.ffn_text.fc1."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output\.dense\.", r"qformer.layers.\1.ffn_text.fc2."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"qformer.layers.\1.ffn_text.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"qformer.layers.\1.ffn_query.fc1."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output_query\.dense\.", r"qformer.layers.\1.ffn_query.fc2."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"qformer.layers.\1.ffn_query.norm."),
    (r"^vision_projection\.", "vision_proj."),
    (r"^text_projection\.", "text_proj."),
    (r"^(itm_head|query_tokens)", r"\1"),
]


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
