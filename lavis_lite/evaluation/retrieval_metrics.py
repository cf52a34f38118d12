"""Image-text retrieval metrics (BLIP-2's protocol): recall@K both ways, optional ITM re-ranking."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from lavis_lite.distributed import reduce_max, world

PairScorer = Callable[[Tensor, Tensor], Tensor]  # (image indices, text indices) -> ITM match logits


def rerank_top_k(sim_i2t: Tensor, k: int, itm_scores: PairScorer) -> tuple[Tensor, Tensor]:
    """BLIP-2 re-ranking: the top k of each row (by ITC) get ITM logit + ITC score; others -inf.

    Returns re-scored (image->text, text->image) matrices, both [N_img, N_txt] / [N_txt, N_img]. Under a
    process group each rank re-scores every world-th row and the ranks' rows are combined (LAVIS's
    `compute_sim_matrix`); every rank gets the whole result.
    """
    rank, size = world()
    k_i2t, k_t2i = min(k, sim_i2t.shape[1]), min(k, sim_i2t.shape[0])
    i2t = torch.full_like(sim_i2t, float("-inf"))
    top = sim_i2t.topk(k_i2t, dim=1).indices
    for i in range(rank, sim_i2t.shape[0], size):
        images = torch.full((k_i2t,), i, dtype=torch.long)
        i2t[i, top[i]] = itm_scores(images, top[i]).float() + sim_i2t[i, top[i]]
    sim_t2i = sim_i2t.t()
    t2i = torch.full_like(sim_t2i, float("-inf"))
    top = sim_t2i.topk(k_t2i, dim=1).indices
    for t in range(rank, sim_t2i.shape[0], size):
        texts = torch.full((k_t2i,), t, dtype=torch.long)
        t2i[t, top[t]] = itm_scores(top[t], texts).float() + sim_t2i[t, top[t]]
    return reduce_max(i2t), reduce_max(t2i)


def retrieval_recall(
    sim_i2t: Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    sim_t2i: Optional[Tensor] = None,
    captions: Optional[Sequence[str]] = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K as fractions: `i2t_r{k}` (an image finds one of its texts), `t2i_r{k}` (a text finds its image).

    sim_t2i defaults to sim_i2t.T (differs after re-ranking). With `captions`, also
    `*_r1_caption`: a top hit counts when its caption text equals the ground truth's (identical
    captions of different images otherwise cap strict R@1).
    """
    sim_t2i = sim_i2t.t() if sim_t2i is None else sim_t2i
    order_i2t = sim_i2t.argsort(dim=1, descending=True)
    order_t2i = sim_t2i.argsort(dim=1, descending=True)
    i2t_rank = torch.tensor(
        [min((order_i2t[i] == t).nonzero().item() for t in texts) for i, texts in enumerate(img2txt)]
    )
    t2i_rank = torch.tensor([(order_t2i[t] == img).nonzero().item() for t, img in enumerate(txt2img)])
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        metrics[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    if captions is not None:
        ids = {c: n for n, c in enumerate(dict.fromkeys(captions))}
        caption_id = [ids[c] for c in captions]
        image_captions = [{caption_id[t] for t in texts} for texts in img2txt]
        metrics["i2t_r1_caption"] = sum(
            caption_id[order_i2t[i, 0].item()] in image_captions[i] for i in range(len(img2txt))
        ) / len(img2txt)
        metrics["t2i_r1_caption"] = sum(
            caption_id[t] in image_captions[order_t2i[t, 0].item()] for t in range(len(txt2img))
        ) / len(txt2img)
    return metrics


def evaluate_similarity(
    sim_i2t: Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    *,
    rerank_k: int = 0,
    itm_scores: Optional[PairScorer] = None,
    captions: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """BLIP-2's retrieval evaluation from an ITC similarity [N_img, N_txt]: `retrieval_recall`'s metrics; with
    `rerank_k` (and `itm_scores`) the same after re-ranking each query's top k, prefixed `itm_`; plus `count`
    (images) and the chance levels `chance_r{k}` of text -> image."""
    metrics = retrieval_recall(sim_i2t, img2txt, txt2img, captions=captions)
    if rerank_k:
        if itm_scores is None:
            raise ValueError("rerank_k needs itm_scores")
        i2t, t2i = rerank_top_k(sim_i2t, rerank_k, itm_scores)
        reranked = retrieval_recall(i2t, img2txt, txt2img, sim_t2i=t2i, captions=captions)
        metrics.update({f"itm_{k}": v for k, v in reranked.items()})
    count = sim_i2t.shape[0]
    metrics.update(count=count, **{f"chance_r{k}": min(1.0, k / count) for k in (1, 5, 10)})
    return metrics
