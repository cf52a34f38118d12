"""The Q-Former's tokenizer: a BERT WordPiece tokenizer plus the `[DEC]` bos token that starts ITG text."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lavis_lite.errors import MissingFileError


def build_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a local BERT tokenizer and add `[DEC]` as its bos token."""
    if not Path(path).is_dir():
        raise MissingFileError(
            f"tokenizer directory not found: {path}: set qformer.tokenizer or qformer.bert to a BERT directory"
            " (the demo's: make demo-assets)"
        )
    if not any((Path(path) / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        raise MissingFileError(f"{path} holds no tokenizer (vocab.txt or tokenizer.json): give a BERT directory")
    tokenizer = AutoTokenizer.from_pretrained(str(path), truncation_side="right")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer
