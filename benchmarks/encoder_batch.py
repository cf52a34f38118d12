"""Frozen-encoder throughput on CPU by images per call, as the feature cache runs it (`data.cache_micro_batch`).

The stage-1 demo recipe's encoder (EfficientNet-Lite0 at 128 px with stages 1-3 max-pooled onto the last
stage's grid; weights drawn at random, which does not change the speed), traced and frozen as the cache
builds it, runs one loader batch of `--batch` images in calls of each `--micro` size; the reference is the
whole batch in one call, measured in the same run. Outputs are checked equal to the reference first.

    .venv/bin/python benchmarks/encoder_batch.py [--batch 128] [--micro 8 16 32 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lavis_lite.data.feature_cache import encode_in_micro_batches, trace_encoder
from lavis_lite.models.vision import build_vision_encoder
from lavis_lite.stage1.config import load_stage1_config

ROOT = Path(__file__).resolve().parent.parent


def images_per_second(encoder, images: torch.Tensor, micro: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best of `repeats` passes over `images` in calls of `micro` images, after one warm-up pass."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            tokens = encode_in_micro_batches(encoder, images, micro)
            best = min(best, time.perf_counter() - start)
    return len(images) / best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images per loader batch (the demo's batch_size)")
    parser.add_argument("--micro", type=int, nargs="+", default=[8, 16, 32, 64], help="images per encoder call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vision = load_stage1_config(ROOT / "configs/stage1/demo.yaml", ["model.vision.checkpoint=null"]).model.vision
    encoder = build_vision_encoder(vision)
    size = vision.image_size
    traced = trace_encoder(encoder, torch.randn(2, 3, size, size))
    images = torch.randn(args.batch, 3, size, size)
    reference, expected = images_per_second(traced, images, args.batch, args.repeats)
    print(f"{vision.name} at {size} px, extra levels {list(vision.extra_levels)}, traced, "
          f"{torch.get_num_threads()} threads, batch {args.batch}")
    print("| images per call | images/s | vs whole batch |\n|---:|---:|---:|")
    print(f"| {args.batch} (whole batch) | {reference:.0f} | 1.00x |")
    for micro in args.micro:
        rate, tokens = images_per_second(traced, images, micro, args.repeats)
        torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)
        print(f"| {micro} | {rate:.0f} | {rate / reference:.2f}x |")


if __name__ == "__main__":
    main()
