"""Collectives that work with or without an initialised process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_cat(x: Tensor) -> Tensor:
    """`x` (equal shapes on every rank) concatenated over ranks along dim 0; no gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns the local shard's."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, size = dist.get_rank(), dist.get_world_size()
        shard = grad.shape[0] // size
        return grad[rank * shard : (rank + 1) * shard]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (equal shapes on every rank) over ranks along dim 0, gradients reaching the local part.

    accelerate's `gather` does not carry gradients back, which the ITC loss needs.
    """
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """LAVIS's `concat_all_gather`: `x` concatenated over ranks along dim 0, detached (the local part too)."""
    x = x.detach()
    return x if world()[1] == 1 else _all_gather_cat(x)


def gather_padded(x: Tensor, pad_value: int) -> Tensor:
    """Concatenate [B, T_rank] tensors over ranks (no gradient), right-padding dim 1 to the longest T."""
    size = world()[1]
    if size == 1:
        return x
    lengths = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([x.shape[1]], device=x.device))
    longest = int(max(t.item() for t in lengths))
    return _all_gather_cat(F.pad(x, (0, longest - x.shape[1]), value=pad_value))


def gather_objects(obj: Any) -> list:
    """Every rank's `obj` (picklable), in rank order; `[obj]` without a process group."""
    size = world()[1]
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def reduce_max(x: Tensor) -> Tensor:
    """The element-wise maximum of `x` over ranks, on `x`'s device (NCCL reduces on the GPU)."""
    if world()[1] == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else x.device
    out = x.to(device).contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(x.device)
