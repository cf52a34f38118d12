"""Two gloo processes with B pairs each give the same ITC/ITG loss and gradients as one process with 2B pairs.

Runs in float64 so that the comparison is exact up to rounding (float32 differs by ~1e-3 relative on
gradients that are sums of cancelling terms, such as the temperature's). The frozen encoder's tokens are
given directly (`vision_tokens`): the encoder is not part of what is distributed.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import text_batch, tiny_model

B = 4
OVERRIDES = ("losses=[itc,itg]",)


def make_batch():
    vision_tokens = torch.randn(2 * B, 17, 32, generator=torch.Generator().manual_seed(0))
    ids, mask = text_batch(2 * B, 9, 100, seed=2)
    sample_ids = torch.tensor([0, 1, 2, 3, 4, 5, 2, 7])  # pairs 2 and 6 share a caption, across ranks
    return vision_tokens, ids, mask, sample_ids


def loss_and_grads(model, vision_tokens, ids, mask, sample_ids):
    out = model(ids, mask, vision_tokens=vision_tokens, sample_ids=sample_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_itc.detach(), out.loss_itg.detach(), grads


def worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    model = tiny_model(*OVERRIDES).train()
    shard = (t[rank * B : (rank + 1) * B] for t in make_batch())
    itc, itg, grads = loss_and_grads(model, *shard)
    # What DDP does: average the losses and gradients over ranks.
    for tensor in [itc, itg, *grads.values()]:
        dist.all_reduce(tensor)
        tensor /= world_size
    if rank == 0:
        torch.save({"itc": itc, "itg": itg, "grads": grads}, result_file)
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    result_file = str(tmp_path / "result.pt")
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), result_file), nprocs=2, join=True)
    distributed = torch.load(result_file)

    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_model(*OVERRIDES).train()
        itc, itg, grads = loss_and_grads(model, *make_batch())
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(distributed["itc"], itc, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(distributed["itg"], itg, atol=1e-12, rtol=1e-10)
    assert set(distributed["grads"]) == set(grads)
    assert len(grads) > 50
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(distributed["grads"][name], grad, atol=1e-12, rtol=1e-9, msg=name)
