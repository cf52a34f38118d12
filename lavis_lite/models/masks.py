"""The Q-Former's three self-attention masks over `[queries ; text]`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MaskKind = Literal["itc", "itm", "itg"]


def build_attention_mask(kind: MaskKind, num_queries: int, text_mask: Tensor) -> Tensor:
    """Who may attend to whom over `[num_queries queries ; T text tokens]`.

    kind: "itc" uni-modal (queries see queries, text sees text), "itm" bi-directional
    (everything sees everything), "itg" multimodal causal (queries see queries, text
    token i sees every query and text tokens <= i).
    text_mask: [B, T], 1 for real tokens, 0 for padding; padded keys are never attended.
    Returns a boolean [B, 1, Q+T, Q+T] mask, True where attention is allowed.
    """
    batch, text_len = text_mask.shape
    total = num_queries + text_len
    device = text_mask.device
    is_query = torch.arange(total, device=device) < num_queries
    rows, cols = is_query[:, None], is_query[None, :]
    if kind == "itm":
        allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    elif kind == "itc":
        allowed = rows == cols
    elif kind == "itg":
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        allowed = torch.where(rows, cols, cols | causal)
    else:
        raise ValueError(f"unknown mask kind '{kind}': expected 'itc', 'itm' or 'itg'")
    keys_real = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    return (allowed[None] & keys_real[:, None, :])[:, None]
