"""Do the query outputs of an image say different things? Query collapse measured as cosine similarities.

BLIP-2 hands all of an image's query outputs to the LLM; if they have merged into one vector (within-image
cosine near 1.0) the LLM gets one vector many times. Stage 1's evaluation records the cosine of the final
query outputs; `qformer_hidden_states` follows it through the Q-Former's layers (tools/stage2_diagnostics.py).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn


def _off_diagonal_mean(gram: Tensor) -> float:
    """Mean of the off-diagonal entries of [..., n, n] matrices."""
    n = gram.shape[-1]
    diagonal = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ((gram.sum((-2, -1)) - diagonal) / (n * (n - 1))).mean().item()


def query_similarity(query_out: Tensor) -> tuple[float, float]:
    """Mean cosine between the queries of one image (1.0: collapsed), and between images for one query
    (1.0: the image is ignored), of query outputs [B, Q, H] with B, Q >= 2."""
    unit = F.normalize(query_out.float(), dim=-1)
    within_image = _off_diagonal_mean(unit @ unit.transpose(1, 2))
    across_images = _off_diagonal_mean(unit.transpose(0, 1) @ unit.permute(1, 2, 0))
    return within_image, across_images


def qformer_hidden_states(qformer: nn.Module, queries_only_pass: Callable[[], object]) -> list[Tensor]:
    """The hidden states after the Q-Former's embeddings and after each of its layers, during a queries-only
    pass of `qformer` (every row is a query) that `queries_only_pass` runs; the last are the query outputs."""
    hidden: list[Tensor] = []

    def keep(module: nn.Module, args: tuple, output: object) -> None:
        hidden.append(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(keep) for m in (qformer.embeddings, *qformer.layers)]
    try:
        queries_only_pass()
    finally:
        for handle in handles:
            handle.remove()
    return hidden
