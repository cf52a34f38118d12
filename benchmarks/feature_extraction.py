"""Feature-extraction throughput: ours (`load_model_and_preprocess` + `extract_features`) against transformers'
`Blip2VisionModelWithProjection` / `Blip2TextModelWithProjection` holding the same weights.

Image mode: pixels -> normalised projected query outputs [B,Q,E] (HF: vision model, Q-Former, vision
projection, as in `Blip2ForImageTextRetrieval`'s ITC branch). Text mode: strings -> normalised projection
of every token [B,T,E] (the same tokenizer call on both sides). The two are first checked to give equal
features, then timed alternately in the same run (warm-up, then the best of `--repeats`).

    .venv/bin/python benchmarks/feature_extraction.py [--batch-size 32 --repeats 10 --device cpu --dtype auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from transformers import Blip2TextModelWithProjection, Blip2VisionModelWithProjection

from lavis_lite.inference.features import Blip2FeatureExtractor, load_model_and_preprocess
from lavis_lite.interop.convert_hf import hf_retrieval_config, to_hf_retrieval

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# An EVA-style ViT (HF's Blip2VisionModel layout) and a MiniLM-sized Q-Former with BLIP-2's 32 queries.
MODEL = {
    "vision": {"kind": "vit", "image_size": 224, "patch_size": 16, "width": 384, "depth": 6, "heads": 6,
               "mlp_dim": 1536},
    "qformer": {"tokenizer": str(ROOT / "weights/all-MiniLM-L6-v2"), "hidden_size": 384, "num_layers": 6,
                "num_heads": 12, "intermediate_size": 1536, "vocab_size": 30523, "num_query_tokens": 32,
                "cross_attention_freq": 2, "dropout": 0.0, "attention_dropout": 0.0},
    "embed_dim": 256,
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross"]


def captions(count: int) -> list[str]:
    """Varied captions of 6 to 14 words."""
    out = []
    for i in range(count):
        first = f"a {'small' if i % 2 else 'large'} {COLOURS[i % 8]} {SHAPES[i % 6]}"
        extra = [f"next to a {COLOURS[(i + k) % 8]} {SHAPES[(i + 2 * k) % 6]}" for k in range(1, 1 + i % 3)]
        out.append(" ".join([first, *extra, "on the left" if i % 4 < 2 else "at the top"]))
    return out


def hf_models(extractor: Blip2FeatureExtractor, dtype: torch.dtype) -> tuple[Blip2VisionModelWithProjection, Blip2TextModelWithProjection]:
    """transformers' image and text feature models with our weights, in `dtype` on our device."""
    config = hf_retrieval_config(extractor.model.cfg)
    state = to_hf_retrieval(extractor.model.state_dict())
    models = []
    for cls in (Blip2VisionModelWithProjection, Blip2TextModelWithProjection):
        model = cls(config).eval()
        expected = model.state_dict()
        missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
        if missing:
            raise KeyError(f"{cls.__name__} lacks {missing[:5]}")
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
        models.append(model.to(device=extractor.device, dtype=dtype))
    return models[0], models[1]


def seconds(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(name: str, ours: Callable, theirs: Callable, items: int, repeats: int, device: torch.device) -> dict:
    """Warm both up twice, then alternate them `repeats` times; items per second from each side's best time
    (on a shared machine other jobs only ever add time)."""
    for _ in range(2):
        ours(), theirs()
    times = {"ours": [], "hf": []}
    for _ in range(repeats):
        times["ours"].append(seconds(ours, device))
        times["hf"].append(seconds(theirs, device))
    best = {side: min(values) for side, values in times.items()}
    return {"mode": name, "ours_per_s": items / best["ours"], "hf_per_s": items / best["hf"],
            "speedup": best["hf"] / best["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: fp32 on CPU, bf16 on CUDA where supported")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    parser.add_argument("--hf-dtype", choices=["same", *DTYPES], default="same",
                        help="transformers' dtype: same as ours (default), or e.g. fp32 (its default on CPU)")
    parser.add_argument("--compile", action="store_true", help="our image path through torch.compile (compile time reported apart)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model.yaml"
        config.write_text(yaml.safe_dump(MODEL))
        extractor, _, _ = load_model_and_preprocess(config, device=device, dtype=DTYPES.get(args.dtype), compile=args.compile)
    hf_dtype = extractor.dtype if args.hf_dtype == "same" else DTYPES[args.hf_dtype]
    hf_vision, hf_text = hf_models(extractor, hf_dtype)
    tokenizer = extractor.tokenizer
    pixels = torch.randn(args.batch_size, 3, extractor.image_size, extractor.image_size, device=device)
    texts = captions(args.batch_size)
    exact = extractor.dtype == hf_dtype == torch.float32
    tolerance = 1e-5 if exact else 5e-2

    def ours_image() -> torch.Tensor:
        return extractor.extract_features({"image": pixels}, mode="image").image_embeds_proj

    @torch.inference_mode()
    def hf_image() -> torch.Tensor:
        return hf_vision(pixel_values=pixels.to(hf_dtype)).image_embeds.float()

    def ours_text() -> torch.Tensor:
        return extractor.extract_features({"text_input": texts}, mode="text").text_embeds_proj

    @torch.inference_mode()
    def hf_text_features() -> torch.Tensor:
        tokens = tokenizer(texts, padding="longest", truncation=True, max_length=extractor.model.cfg.max_text_len,
                           return_tensors="pt").to(device)
        return hf_text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds.float()

    start = time.perf_counter()
    ours_image()  # with --compile: the compilation (inductor's cache makes a second process skip most of it)
    first_call = time.perf_counter() - start
    real = extractor.tokenize(texts).attention_mask.bool()
    torch.testing.assert_close(ours_image(), hf_image(), atol=tolerance, rtol=0)
    torch.testing.assert_close(ours_text()[real], hf_text_features()[real], atol=tolerance, rtol=0)

    rows = [compare("image", ours_image, hf_image, args.batch_size, args.repeats, device),
            compare("text", ours_text, hf_text_features, args.batch_size, args.repeats, device)]
    dtype_name = next(k for k, v in DTYPES.items() if v == extractor.dtype)
    hf_name = next(k for k, v in DTYPES.items() if v == hf_dtype)
    print(f"device {device}, ours {dtype_name}, transformers {hf_name}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"ViT {MODEL['vision']['width']}x{MODEL['vision']['depth']} at {extractor.image_size} px, "
          f"Q-Former {MODEL['qformer']['hidden_size']}x{MODEL['qformer']['num_layers']}, "
          f"{extractor.num_queries} queries; features equal within {tolerance:g}"
          + (f"; compiled image path, first batch {first_call:.1f} s" if args.compile else ""))
    print(f"{'mode':<8}{'ours /s':>12}{'HF /s':>12}{'ours / HF':>12}")
    for row in rows:
        print(f"{row['mode']:<8}{row['ours_per_s']:>12.1f}{row['hf_per_s']:>12.1f}{row['speedup']:>11.2f}x")
    if args.json:
        print(json.dumps({"device": str(device), "dtype": dtype_name, "hf_dtype": hf_name, "batch_size": args.batch_size,
                          "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()
