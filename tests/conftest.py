import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

from lavis_lite import create_model
from lavis_lite.config import ModelConfig, load_model_config

NO_DROPOUT = ["qformer.dropout=0", "qformer.attention_dropout=0"]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_bert_tokenizer(directory: Path, words) -> Path:
    """A BERT WordPiece tokenizer of BERT's special tokens and `words`, saved to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join([*BERT_SPECIAL, *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(directory)  # positional: `vocab_file` in transformers 4, `vocab` in 5
    return directory


def tiny_config(*overrides: str) -> ModelConfig:
    """The tiny test model (configs/model/tiny.yaml) without dropout, so runs compare exactly."""
    return load_model_config("tiny", [*NO_DROPOUT, *overrides])


def tiny_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    model, _ = create_model(tiny_config(*overrides))
    return model


def redraw_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Re-draw every parameter at random (LayerNorm weights around 1), so no value is a trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_weight = name.endswith("weight") and p.dim() == 1
            p.copy_(1 + noise if is_norm_weight else noise)
        if hasattr(model, "temp"):
            model.temp.fill_(0.07)


def text_batch(batch: int, length: int, vocab: int, lengths=None, seed: int = 0):
    """Random token ids with `[CLS]`-like id 1 first and right padding to the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab - 1, (batch, length), generator=gen)
    ids[:, 0] = 1
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths or [length] * batch):
        mask[i, n:] = 0
        ids[i, n:] = 0
    return ids, mask


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
