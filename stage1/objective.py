"""The stage-1 objective: ITC + ITM + ITG on a batch of pixels or cached encoder tokens."""

from __future__ import annotations

from torch import Tensor, nn


def stage1_loss(model: nn.Module, batch: dict) -> dict[str, Tensor]:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        images=batch.get("image"),
        vision_tokens=batch.get("vision_tokens"),
        sample_ids=batch["sample_id"],
    )
    losses = {"loss": out.loss}
    for name in ("itc", "itm", "itg"):
        value = getattr(out, f"loss_{name}")
        if value is not None:
            losses[name] = value.detach()
    return losses
