"""Tiny language models (Llama, OPT, T5) with random weights and a word-level tokenizer, saved locally."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from lavis_lite.demo.synthetic import COLOURS, SHAPES

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [
    *SHAPES, *COLOURS, "small", "large", "a", "an", "the", "there", "is", "image", "of", "picture", "with", "photo",
    "on", "left", "right", "at", "top", "bottom", "in", "center", "corner", "and", "to", "above", "below",
    "question", "answer", ":", "what", "colour", "?", "how", "many", "shapes",
]
PAD, BOS, EOS = 0, 1, 2


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


VOCAB = len(SPECIALS) + len(WORDS)


def tiny_llm(kind: str, seed: int = 0):
    """A random tiny `kind` model (llama | opt | t5) over the word vocabulary, weights drawn with std 0.2."""
    torch.manual_seed(seed)
    ids = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, vocab_size=VOCAB)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **ids)
        model = LlamaForCausalLM(cfg)
    elif kind == "opt":
        cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0, **ids)
        model = OPTForCausalLM(cfg)
    elif kind == "t5":
        cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                       decoder_start_token_id=PAD, **ids)
        model = T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(kind)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.dim() == 1 and "norm" in name.lower() and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if norm_weight else 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_tiny_llm(kind: str, root: Path, seed: int = 0) -> Path:
    """Save a tiny LLM and the word tokenizer as a transformers model directory; returns its path."""
    path = Path(root) / f"tiny-{kind}"
    tiny_llm(kind, seed).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path
