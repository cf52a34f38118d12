"""BLIP-2's losses as pure functions of scores and labels: stage 1's ITC, ITM (with hard-negative sampling) and
ITG, and stage 2's LM loss. The models compute the scores; these say what is optimised."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, positives: Tensor, temp: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Image-text contrastive loss: the mean of both directions' cross-entropy at temperature `temp`.

    `sim_i2t` [B, B_all]: this batch's images against every text; `sim_t2i` [B, B_all]: its texts against every
    image; `positives` [B, B_all]: which columns match each row (the diagonal, plus pairs sharing a caption),
    the target spread evenly over them.
    """
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    i2t = F.cross_entropy(sim_i2t / temp, targets, label_smoothing=label_smoothing)
    t2i = F.cross_entropy(sim_t2i / temp, targets, label_smoothing=label_smoothing)
    return (i2t + t2i) / 2


def sample_negatives(logits: Tensor, positives: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One column per row drawn with probability softmax(logits) over the non-positive columns (BLIP-2's hard
    negatives for ITM: the more similar, the likelier); a row with no negative draws uniformly."""
    logits = logits.float().masked_fill(positives, float("-inf"))
    no_negative = positives.all(dim=1, keepdim=True)
    logits = torch.where(no_negative, torch.zeros_like(logits), logits)
    return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)


def itm_loss(logits: Tensor) -> Tensor:
    """Image-text matching loss over logits [3B, 2] (no match, match) laid out as B positive pairs, then B pairs
    with a negative image, then B with a negative text."""
    count = logits.shape[0] // 3
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:count] = 1
    return F.cross_entropy(logits, labels)


def itg_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Image-grounded text generation loss: next-token cross-entropy [N, V] against [N] over the real tokens."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Stage 2's language-modelling loss: logits [B, T, V] at the positions that predict `labels` [B, T]
    (already aligned), in fp32, positions labelled IGNORE left out."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
