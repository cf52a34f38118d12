"""Data-loader throughput on the synthetic shards: samples/s by transform, output size and worker count.

    python benchmarks/dataloader.py                        # 0/1/2 workers, train/eval transform, 128/224 px
    python benchmarks/dataloader.py --workers 0 4 --sizes 224 --batches 50

Streams the synthetic training shards (generated once under --data) endlessly, as training does, and
times `--batches` batches after a warm-up batch (worker start-up excluded). Not a test.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lavis_lite.data import DataConfig, PairTransform  # noqa: E402
from lavis_lite.data.samples import Collator, make_loader  # noqa: E402
from lavis_lite.data.webdataset_pipeline import build_wds_pipeline  # noqa: E402
from lavis_lite.demo.assets import minilm_bert_dir  # noqa: E402
from lavis_lite.demo.synthetic import generate  # noqa: E402
from lavis_lite.models.tokenizer import build_tokenizer  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as EfficientNet-Lite0 uses


def measure(shards: str, tokenizer, transform: str, size: int, workers: int, batch_size: int, batches: int) -> float:
    """Samples per second over `batches` batches, after one warm-up batch."""
    cfg = DataConfig(batch_size=batch_size, num_workers=workers, flip_swaps_left_right=True)
    pair = PairTransform.from_config(cfg, size, MEAN, STD, train=transform == "train")
    # Always the training stream (endless, shuffled); only the transform differs.
    pipeline = build_wds_pipeline(shards, pair, Collator(tokenizer), cfg, train=True)
    loader = make_loader(pipeline, workers, pin_memory=False)
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - start
    del stream, loader  # stop the workers before the next configuration
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/synthetic-bench", help="synthetic data folder (generated if missing)")
    parser.add_argument("--train-images", type=int, default=4000, help="training images to generate")
    parser.add_argument("--source-size", type=int, default=128, help="side of the stored images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="transform output sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--transforms", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    args = parser.parse_args()

    generate(args.data, train=args.train_images, val=0, image_size=args.source_size)
    shards = os.path.join(args.data, "train")
    tokenizer = build_tokenizer(minilm_bert_dir())
    print(f"{args.batches} batches of {args.batch_size}, {args.source_size} px JPEG shards, {os.cpu_count()} CPUs")
    print(f"{'transform':<10}{'size':>6}{'workers':>9}{'samples/s':>11}")
    for transform in args.transforms:
        for size in args.sizes:
            for workers in args.workers:
                rate = measure(shards, tokenizer, transform, size, workers, args.batch_size, args.batches)
                print(f"{transform:<10}{size:>6}{workers:>9}{rate:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
