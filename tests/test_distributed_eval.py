"""Held-out evaluation shared out over two gloo processes gives every rank what one process computes: stage 1's
retrieval (ITM re-ranking rows split over the ranks, as LAVIS's `compute_sim_matrix`) and stage 2's captions
(the held-out chunks split over the ranks)."""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import save_bert_tokenizer, tiny_model
from lavis_lite.data.training_data import HeldOut
from lavis_lite.models.tokenizer import build_tokenizer
from stage1.config import EvalConfig
from stage1.evaluate import evaluate_retrieval
from stage2.config import CaptionEvalConfig
from stage2.evaluate import evaluate_captions

WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "small", "large"]
CAPTIONS = [f"a {size} {colour} {shape}" for size in ("small", "large") for colour in ("red", "blue", "green")
            for shape in ("circle", "square")][:11]


def held_out(count: int) -> HeldOut:
    """`count` images' encoder tokens (image i's first value is i) in chunks of 3, with captions."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(count, 17, 32, generator=gen)
    tokens[:, 0, 0] = torch.arange(count, dtype=torch.float)
    return HeldOut(CAPTIONS[:count], lambda: iter(tokens.split(3)), [f"key{i}" for i in range(count)])


def retrieval(tokenizer_dir) -> tuple[dict, int]:
    """The metrics, and how many image-text pairs this process scored with ITM."""
    tokenizer = build_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = tiny_model(f"qformer.vocab_size={len(tokenizer)}").eval()
    itm_logits, scored = model.itm_logits, []

    def counted(image_embeds, *args):
        scored.append(len(image_embeds))
        return itm_logits(image_embeds, *args)

    model.itm_logits = counted
    metrics = evaluate_retrieval(model, tokenizer, held_out(11), EvalConfig(itm_rerank_k=4, batch_size=4), 16)
    return metrics, sum(scored)


class Captioner(nn.Module):
    """Stands in for `Blip2Stage2` in `evaluate_captions`: each image's caption and loss come from its index."""

    def __init__(self):
        super().__init__()
        self.language_projection = nn.Linear(1, 1)
        self.captioned = 0

    def forward(self, vision_tokens, **batch):
        return SimpleNamespace(loss=vision_tokens[:, 0, 0].mean() / 10)

    def query_outputs(self, vision_tokens):
        return vision_tokens[:, :2]

    def generate(self, vision_tokens=None, batch_size=None, **settings):
        if vision_tokens is None:
            return ["a red circle"] * batch_size
        self.captioned += len(vision_tokens)
        return [CAPTIONS[int(i)] if int(i) % 2 else "a blue star" for i in vision_tokens[:, 0, 0]]


def captions() -> tuple[dict, int]:
    """The metrics, and how many images this process captioned."""
    cfg = CaptionEvalConfig(num_beams=1, max_new_tokens=4, max_images=10, examples=3, synthetic_attributes=True)
    model = Captioner()
    metrics = evaluate_captions(model, held_out(11), cfg, lambda texts: {"input_ids": torch.zeros(len(texts), 1)})
    return metrics, model.captioned


def worker(rank: int, world_size: int, init_file: str, tokenizer_dir: str, out: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.save({"retrieval": retrieval(tokenizer_dir), "captions": captions()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_evaluate_as_one(tmp_path):
    tokenizer_dir = save_bert_tokenizer(tmp_path / "tokenizer", WORDS)
    out = str(tmp_path / "result")
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), str(tokenizer_dir), out), nprocs=2, join=True)
    expected = {"retrieval": retrieval(tokenizer_dir), "captions": captions()}
    assert expected["captions"][0]["caption_images"] == 10 and 0 < expected["captions"][0]["caption_attr_acc"] < 1
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for rank, got in enumerate(results):
        for part in ("retrieval", "captions"):
            metrics, wanted = got[part][0], expected[part][0]
            assert metrics.keys() == wanted.keys()
            for key, value in wanted.items():
                if isinstance(value, float):
                    assert abs(metrics[key] - value) < 1e-6, (rank, part, key)
                else:
                    assert metrics[key] == value, (rank, part, key)
    # The work is shared, not repeated: the ranks' ITM pairs and captioned images add up to one process's.
    for part in ("retrieval", "captions"):
        shares = [got[part][1] for got in results]
        assert sum(shares) == expected[part][1] and all(0 < share < expected[part][1] for share in shares), (part, shares)
