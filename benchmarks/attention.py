"""Q-Former attention on this device: explicit matmul-softmax vs PyTorch SDPA, fp32 and bf16 autocast.

Times one forward+backward of a joint (ITM-style) pass over [queries ; text] and prints a table with
each row's speed relative to eager fp32 measured in the same run. `qformer.attn_impl=auto` uses the
result: SDPA on CUDA, explicit attention on CPU.

    .venv/bin/python benchmarks/attention.py [--hidden 384 --layers 6 --batch 32 --device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from lavis_lite.config import QFormerConfig
from lavis_lite.models.masks import build_attention_mask
from lavis_lite.models.qformer import QFormer


def time_step(qformer: QFormer, queries, ids, allowed, image, dtype, device, repeats: int) -> float:
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    timings = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out, _ = qformer(query_embeds=queries, input_ids=ids, allowed=allowed, image_embeds=image)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first two are warm-up
            timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def matmul_tflops(dtype: torch.dtype, device: torch.device, size: int = 1024) -> float:
    """Throughput of one square matrix product in this dtype (the device's raw rate)."""
    a = torch.randn(size, size, device=device).to(dtype)
    a @ a
    start, repeats = time.perf_counter(), 3
    for _ in range(repeats):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--image-tokens", type=int, default=49)
    parser.add_argument("--image-width", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ids = torch.randint(5, 30000, (args.batch, args.text_len), device=device)
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, args.text_len // 2 :] = 0
    allowed = build_attention_mask("itm", args.queries, mask)
    image = torch.randn(args.batch, args.image_tokens, args.image_width, device=device)

    rows, skipped = [], []
    rates = {dtype: matmul_tflops(dtype, device) for dtype in (torch.float32, torch.bfloat16)}
    for dtype in (torch.float32, torch.bfloat16):
        if rates[dtype] < rates[torch.float32] / 10:
            skipped.append(f"{dtype}: matmul runs at {rates[dtype]:.4f} TFLOP/s here (no native support), not timed")
            continue
        for impl in ("eager", "sdpa"):
            cfg = QFormerConfig(
                hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                intermediate_size=4 * args.hidden, num_query_tokens=args.queries, attn_impl=impl,
            )
            qformer = QFormer(cfg, encoder_width=args.image_width).to(device).train()
            queries = torch.randn(args.batch, args.queries, args.hidden, device=device, requires_grad=True)
            seconds = time_step(qformer, queries, ids, allowed, image, dtype, device, args.repeats)
            rows.append((impl, str(dtype).removeprefix("torch."), seconds))
    baseline = rows[0][2]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Q-Former fwd+bwd, {args.layers} layers x {args.hidden}, batch {args.batch}, "
          f"{args.queries} queries + {args.text_len} text tokens, {name}")
    print("matmul TFLOP/s: " + ", ".join(f"{str(d).removeprefix('torch.')} {r:.3f}" for d, r in rates.items()))
    print(f"{'attention':<10} {'dtype':<9} {'ms/step':>9} {'speed vs eager fp32':>20}")
    for impl, dtype, seconds in rows:
        print(f"{impl:<10} {dtype:<9} {seconds * 1e3:>9.1f} {baseline / seconds:>19.2f}x")
    for line in skipped:
        print("skipped " + line)


if __name__ == "__main__":
    main()
