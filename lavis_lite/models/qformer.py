"""The Q-Former: BERT layers shared by learned queries and text, cross-attending to image tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavis_lite.checkpoint import read_state_dict
from lavis_lite.config import ConfigError, QFormerConfig
from lavis_lite.errors import MissingFileError

KeyValue = tuple[Tensor, Tensor]


def resolve_attn_impl(impl: str, device: torch.device) -> str:
    """"auto" picks SDPA on CUDA and explicit matmul-softmax on CPU.

    On CPU, SDPA's bf16 backward measured several times slower than the explicit
    form (benchmarks/attention.py), which erases the gain of bf16 autocast.
    """
    if impl == "auto":
        return "sdpa" if device.type == "cuda" else "eager"
    if impl not in ("sdpa", "eager"):
        raise ConfigError(f"qformer.attn_impl='{impl}' is not one of auto, sdpa, eager")
    return impl


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], dropout: float, impl: str) -> Tensor:
    """Multi-head attention over [B, H, L, d] tensors; `allowed` is a boolean [B, 1, Lq, Lk] mask."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(dim=-1), dropout)
    return probs.to(v.dtype) @ v


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class SelfAttention(nn.Module):
    """Post-LN BERT self-attention with a fused QKV projection and an optional key/value prefix."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.attn_dropout = cfg.attention_dropout
        self.attn_impl = cfg.attn_impl
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, allowed: Optional[Tensor], prefix: Optional[KeyValue] = None) -> tuple[Tensor, KeyValue]:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        dropout = self.attn_dropout if self.training else 0.0
        impl = resolve_attn_impl(self.attn_impl, x.device)
        context = _merge_heads(attention(q, k, v, allowed, dropout, impl))
        return self.norm(x + self.dropout(self.out(context))), (k, v)


class CrossAttention(nn.Module):
    """Post-LN cross-attention from the queries to the image tokens (K/V project C -> hidden)."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int):
        super().__init__()
        self.heads = cfg.num_heads
        self.attn_dropout = cfg.attention_dropout
        self.attn_impl = cfg.attn_impl
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(encoder_width, 2 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, image_embeds: Tensor) -> Tensor:
        q = _split_heads(self.q(x), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.kv(image_embeds).chunk(2, dim=-1))
        dropout = self.attn_dropout if self.training else 0.0
        impl = resolve_attn_impl(self.attn_impl, x.device)
        context = _merge_heads(attention(q, k, v, None, dropout, impl))
        return self.norm(x + self.dropout(self.out(context)))


class FeedForward(nn.Module):
    """Post-LN BERT feed-forward block."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    """Shared self-attention; query rows get cross-attention and their own FFN, text rows the text FFN."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, has_cross_attention: bool, with_text: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg, encoder_width) if has_cross_attention else None
        self.ffn_text = FeedForward(cfg) if with_text else None
        self.ffn_query = FeedForward(cfg)

    def forward(
        self,
        x: Tensor,
        num_queries: int,
        allowed: Optional[Tensor],
        image_embeds: Optional[Tensor],
        prefix: Optional[KeyValue],
    ) -> tuple[Tensor, KeyValue]:
        x, key_value = self.self_attn(x, allowed, prefix)
        if num_queries == 0:
            return self.ffn_text(x), key_value
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            if image_embeds is None:
                raise ValueError("queries need image_embeds: this layer cross-attends to the image")
            queries = self.cross_attn(queries, image_embeds)
        queries = self.ffn_query(queries)
        if text.shape[1] == 0:
            return queries, key_value
        return torch.cat([queries, self.ffn_text(text)], dim=1), key_value


class Embeddings(nn.Module):
    """Word + position embeddings for text; queries get no position. Both go through one LayerNorm."""

    def __init__(self, cfg: QFormerConfig, with_text: bool = True):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0) if with_text else None
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if with_text else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, query_embeds: Optional[Tensor], input_ids: Optional[Tensor]) -> Tensor:
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(positions))
        return self.dropout(self.norm(torch.cat(parts, dim=1)))


class LMHead(nn.Module):
    """BERT's prediction head, its decoder tied to the word embeddings (for ITG)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)


class QFormer(nn.Module):
    """BERT encoder whose layers serve queries and text; every `cross_attention_freq`-th layer cross-attends.

    `with_text=False` builds the query side only (stage 2): no word/position embeddings, text FFNs or ITG head.
    """

    def __init__(self, cfg: QFormerConfig, encoder_width: int, with_text: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, with_text)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, encoder_width, i % cfg.cross_attention_freq == 0, with_text)
            for i in range(cfg.num_layers)
        )
        self.lm_head = LMHead(cfg) if with_text else None
        self.apply(_init_bert_weights)

    def forward(
        self,
        query_embeds: Optional[Tensor] = None,
        input_ids: Optional[Tensor] = None,
        allowed: Optional[Tensor] = None,
        image_embeds: Optional[Tensor] = None,
        prefix: Optional[list[KeyValue]] = None,
    ) -> tuple[Tensor, list[KeyValue]]:
        """Run `[queries ; text]` through the layers.

        allowed: boolean [B, 1, L, L(+prefix)] self-attention mask (None: all see all).
        prefix: per-layer keys/values of an earlier pass prepended to this pass's (ITG
        reuses the queries' image pass this way). Returns hidden states and this pass's
        per-layer keys/values (prefix included).
        """
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        x = self.embeddings(query_embeds, input_ids)
        key_values = []
        for i, layer in enumerate(self.layers):
            x, key_value = layer(x, num_queries, allowed, image_embeds, None if prefix is None else prefix[i])
            key_values.append(key_value)
        return x, key_values

    def lm_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden, self.embeddings.word.weight)


def _init_bert_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


BERT_ARCH_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}


def load_bert_weights(qformer: QFormer, bert_dir: str | Path) -> None:
    """Initialise a Q-Former from a local BERT checkpoint (any `BertModel` directory).

    Self-attention, text FFN, embeddings and (when present) the MLM head come from
    BERT; each query FFN starts as a copy of its layer's text FFN; cross-attention
    and rows added to the vocabulary (e.g. `[DEC]`) keep their random init. A query-only
    Q-Former (`with_text=False`, stage 2) takes the same weights less the text side.
    The self-attention output projections' weights are multiplied by `qformer.bert_self_attention_scale`.
    """
    scale = qformer.cfg.bert_self_attention_scale
    if not scale > 0:
        raise ConfigError(f"qformer.bert_self_attention_scale={scale} must be above 0 (1.0: BERT's weights as they are)")
    bert_dir = Path(bert_dir)
    config_file = bert_dir / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"qformer.bert={bert_dir} has no config.json: point it at a BertModel directory")
    bert_cfg = json.loads(config_file.read_text())
    mismatched = [
        f"qformer.{ours}={getattr(qformer.cfg, ours)} but {bert_dir} has {bert_cfg[theirs]}"
        for theirs, ours in BERT_ARCH_FIELDS.items()
        if theirs in bert_cfg and bert_cfg[theirs] != getattr(qformer.cfg, ours)
    ]
    if mismatched:
        raise ConfigError("Q-Former config does not match its BERT checkpoint: " + "; ".join(mismatched))
    weights = next((bert_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (bert_dir / n).is_file()), None)
    if weights is None:
        raise MissingFileError(f"qformer.bert={bert_dir} holds no model.safetensors or pytorch_model.bin")
    bert = {k.removeprefix("bert."): v for k, v in read_state_dict(weights, "qformer.bert").items()}

    def take(name: str) -> Tensor:
        if name not in bert:
            raise KeyError(f"{weights} lacks '{name}': is it a BERT checkpoint?")
        return bert[name]

    word = take("embeddings.word_embeddings.weight")
    if word.shape[0] > qformer.cfg.vocab_size:
        raise ConfigError(f"qformer.vocab_size={qformer.cfg.vocab_size} is smaller than {bert_dir}'s {word.shape[0]} tokens")
    with torch.no_grad():
        emb = qformer.embeddings
        if emb.word is not None:
            emb.word.weight[: word.shape[0]] = word
            # BERT adds token type 0 to every token; folding it into the positions keeps BERT's function exactly.
            position = take("embeddings.position_embeddings.weight")
            token_type = bert.get("embeddings.token_type_embeddings.weight")
            emb.position.weight.copy_(position + (0 if token_type is None else token_type[0]))
        emb.norm.weight.copy_(take("embeddings.LayerNorm.weight"))
        emb.norm.bias.copy_(take("embeddings.LayerNorm.bias"))
        for i, layer in enumerate(qformer.layers):
            p = f"encoder.layer.{i}."
            attn = layer.self_attn
            attn.qkv.weight.copy_(torch.cat([take(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")]))
            attn.qkv.bias.copy_(torch.cat([take(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")]))
            attn.out.weight.copy_(take(p + "attention.output.dense.weight") * scale)
            attn.out.bias.copy_(take(p + "attention.output.dense.bias"))
            attn.norm.weight.copy_(take(p + "attention.output.LayerNorm.weight"))
            attn.norm.bias.copy_(take(p + "attention.output.LayerNorm.bias"))
            for ffn in filter(None, (layer.ffn_text, layer.ffn_query)):
                ffn.fc1.weight.copy_(take(p + "intermediate.dense.weight"))
                ffn.fc1.bias.copy_(take(p + "intermediate.dense.bias"))
                ffn.fc2.weight.copy_(take(p + "output.dense.weight"))
                ffn.fc2.bias.copy_(take(p + "output.dense.bias"))
                ffn.norm.weight.copy_(take(p + "output.LayerNorm.weight"))
                ffn.norm.bias.copy_(take(p + "output.LayerNorm.bias"))
        head = qformer.lm_head
        if head is not None and "cls.predictions.transform.dense.weight" in bert:
            head.dense.weight.copy_(bert["cls.predictions.transform.dense.weight"])
            head.dense.bias.copy_(bert["cls.predictions.transform.dense.bias"])
            head.norm.weight.copy_(bert["cls.predictions.transform.LayerNorm.weight"])
            head.norm.bias.copy_(bert["cls.predictions.transform.LayerNorm.bias"])
            bias = bert["cls.predictions.bias"]
            head.bias[: bias.shape[0]] = bias
