"""Stage-1 training step of a config on this device: time per phase, samples/s, and our Q-Former against
transformers' `Blip2QFormerModel` (same shapes, same run) as a reference.

    .venv/bin/python benchmarks/stage1_step.py [--config configs/stage1/demo.yaml] [--batch 128] [key=value ...]

Image tokens are random (the shape the frozen encoder gives for the config, as a feature cache feeds them),
so no data is needed; the Q-Former starts from random weights (`model.qformer.bert=null`).
"""

from __future__ import annotations

import argparse
import time

import torch

from lavis_lite.models.stage1_model import Blip2Stage1
from lavis_lite.precision import resolve_autocast
from lavis_lite.training.train_loop import param_groups
from lavis_lite.stage1.config import load_stage1_config


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stage1/demo.yaml")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's data.batch_size")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_stage1_config(args.config, ["model.qformer.bert=null", "model.vision.checkpoint=null", *args.overrides])
    batch = args.batch or cfg.data.batch_size
    precision = resolve_autocast(cfg.train.precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(0)
    model = Blip2Stage1(cfg.model).train()
    tokens = model.vision.num_tokens(cfg.model.vision.image_size)
    image_embeds = torch.randn(batch, tokens, model.vision.width)
    ids = torch.randint(1000, 2000, (batch, args.text_len))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[::2, args.text_len * 3 // 4 :] = 0
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)

    def forward():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model(ids, mask, vision_tokens=image_embeds)

    def forward_backward():
        forward().loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    t_forward = timed(forward, args.repeats)
    t_step = timed(forward_backward, args.repeats)
    t_optim = timed(optimizer_step, args.repeats)
    total = t_step + t_optim

    # Reference: the joint (ITM) pass of transformers' Q-Former against ours, same shapes, forward+backward.
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    q = cfg.model.qformer
    hf = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=model.vision.width, use_qformer_text_input=True,
        hidden_dropout_prob=q.dropout, attention_probs_dropout_prob=q.attention_dropout,
    )).train()
    num_queries = model.num_queries
    joint_mask = torch.cat([torch.ones(batch, num_queries, dtype=torch.long), mask], dim=1)

    def ours():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model.multimodal_features(image_embeds, ids, mask)
        out.float().mean().backward()

    def theirs():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            embeds = torch.cat([model.query_tokens.expand(batch, -1, -1), model.qformer.embeddings.word(ids)], 1)
            out = hf(query_embeds=embeds, query_length=num_queries, attention_mask=joint_mask,
                     encoder_hidden_states=image_embeds).last_hidden_state
        out[:, :num_queries].float().mean().backward()

    t_ours, t_theirs = timed(ours, args.repeats), timed(theirs, args.repeats)
    print(f"stage-1 step, {args.config}: batch {batch}, {q.num_query_tokens} queries, {tokens} image tokens, "
          f"text {args.text_len}, losses {'+'.join(cfg.model.losses)}, ITM on "
          f"{cfg.model.itm_batch_fraction:.0%} and ITG on {cfg.model.itg_batch_fraction:.0%} of the batch, precision {precision}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'phase':<28}{'seconds':>9}{'share':>8}")
    for name, seconds in (("forward (3 losses)", t_forward), ("backward", t_step - t_forward),
                          ("optimizer (AdamW)", t_optim)):
        print(f"{name:<28}{seconds:>9.3f}{seconds / total:>8.0%}")
    print(f"{'step':<28}{total:>9.3f}{'':>8}   {batch / total:.1f} samples/s")
    print(f"joint pass fwd+bwd: ours {t_ours:.3f} s, transformers Blip2QFormerModel {t_theirs:.3f} s "
          f"-> ours is {t_theirs / t_ours:.2f}x the speed")


if __name__ == "__main__":
    main()
