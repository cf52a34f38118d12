"""Every GPU measurement in one call: parity on CUDA, the paper-size stage-1 and stage-2 steps, feature extraction
against transformers, faiss-gpu against faiss-cpu. Writes `results.json` and `results.md` to `--out`.

    python benchmarks/gpu_suite.py --out runs/gpu-suite            # one H100 / H200: within 8 minutes
    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu-suite    # CPU, tiny configs (make test runs this)

Random weights built from configs (nothing from a hub): the stage-1 model is LAVIS's architecture
(`blip2-lavis-vitg`: EVA ViT-g/14, 39 blocks, bert-base Q-Former, 32 queries); the stage-2 LLMs are OPT-2.7B-
and FlanT5-XL-shaped. Sections:

  parity        ITC / ITM against `Blip2ForImageTextRetrieval` and stage-2 logits against
                `Blip2ForConditionalGeneration`, fp32 (1e-5 / 1e-4) and bf16 (stated tolerances), on the device
  stage1        samples/s, model FLOPs utilisation against a bf16 matmul measured in the same run, the time
                of each phase (frozen ViT forward, Q-Former forward, backward, optimizer), peak memory, at the
                largest batch that fits; the same from cached encoder tokens; with and without torch.compile
  stage2        per LLM: training samples/s, peak memory, batched beam-search captions/s
  features      image features/s of ours and of transformers on the same weights (bf16)
  faiss         flat and IVF search over 100k images x 32 vectors: faiss-gpu against faiss-cpu

A section that fails is recorded with its error and the others still run. Not a test (its `--smoke` is).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lavis_lite.config import Stage2ModelConfig, load_model_config, merge_config
from lavis_lite.interop.convert_hf import (
    hf_conditional_generation_config,
    hf_retrieval_config,
    to_hf_conditional_generation,
    to_hf_retrieval,
)
from lavis_lite.models.llm import lm_inputs, padded_prompt_ids
from lavis_lite.models.stage1_model import Blip2Stage1
from lavis_lite.models.stage2_model import Blip2Stage2

TOLERANCES = {"fp32_itc": 1e-5, "fp32_itm": 1e-5, "fp32_logits": 1e-4, "bf16_itc": 2e-2, "bf16_itm": 0.25, "bf16_logits": 0.5}


class Clock:
    """Wall time of a call on `device` (CUDA synchronised), the mean of `repeats` after `warmup`."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeats


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` ids (w0, w1, ...), special tokens first, for random LLMs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(min(vocab_size, 2000) - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llm_config(kind: str, smoke: bool):
    from transformers import OPTConfig, T5Config

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "opt":
        if smoke:
            return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, vocab_size=100, **ids)
        return OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=2560, vocab_size=50272, **ids)
    if smoke:
        return T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100, decoder_start_token_id=0, **ids)
    return T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=32128, feed_forward_proj="gated-gelu",
                    decoder_start_token_id=0, tie_word_embeddings=False, **ids)


def stage1_config(smoke: bool, *overrides: str):
    if smoke:
        return load_model_config("tiny", ["qformer.dropout=0", "qformer.attention_dropout=0", *overrides])
    return load_model_config("blip2-lavis-vitg", ["qformer.bert=null", "vision.checkpoint=null", "lavis_checkpoint=null", *overrides])


def redraw_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1 + noise if (name.endswith("weight") and p.dim() == 1) else noise)


# ---- parity ---------------------------------------------------------------------------------------------
def parity(device: torch.device, smoke: bool) -> dict:
    """ITC / ITM and stage-2 logits against transformers on the same weights, fp32 and bf16 (tiny configs: the
    kernels, not the sizes, are what differs on a GPU)."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    out = {}
    torch.manual_seed(0)
    cfg = stage1_config(True)
    ours = Blip2Stage1(cfg).eval()
    redraw_(ours)
    hf = Blip2ForImageTextRetrieval(hf_retrieval_config(cfg)).eval()
    hf.load_state_dict(to_hf_retrieval(ours.state_dict()), strict=False)
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(5, cfg.qformer.vocab_size - 1, (4, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = ours.to(device, dtype), hf.to(device, dtype)
        x, i, m = images.to(device, dtype), ids.to(device), mask.to(device)
        with torch.no_grad():
            embeds = a.ln_vision(a.vision(x).to(dtype))  # the frozen encoder keeps its own precision
            _, image_feats, _ = a.image_features(embeds)
            _, text_feats = a.text_features(i, m)
            sim = a.itc_similarity(image_feats, text_feats).float()
            hf_sim = torch.stack([b(pixel_values=img[None].expand(4, -1, -1, -1), input_ids=i, attention_mask=m).logits_per_image[0] for img in x]).float()
            itm = a.itm_logits(embeds, i, m).float()
            hf_itm = b(pixel_values=x, input_ids=i, attention_mask=m, use_image_text_matching_head=True).logits_per_image.float()
        out[f"{name}_itc"] = float((sim - hf_sim).abs().max())
        out[f"{name}_itm"] = float((itm - hf_itm).abs().max())
    tokenizer = word_tokenizer(100)
    text_config = llm_config("opt", True)
    from transformers import OPTForCausalLM

    torch.manual_seed(0)
    llm = OPTForCausalLM(text_config).eval()
    s2cfg = merge_config(Stage2ModelConfig, [{"vision": {k: v for k, v in vars(cfg.vision).items()}, "qformer": vars(cfg.qformer)}], ["llm.precision=fp32"])
    stage2 = Blip2Stage2(s2cfg, llm, tokenizer).eval()
    redraw_(stage2, std=0.2)
    image_token = 99
    hf2 = Blip2ForConditionalGeneration(hf_conditional_generation_config(s2cfg, text_config, image_token)).eval()
    hf2.load_state_dict(to_hf_conditional_generation(stage2.state_dict()), strict=False)
    batch = lm_inputs(tokenizer, False, ["w5 w6", "w7"], ["w8 w9 w10", "w11"], 16)
    queries = s2cfg.qformer.num_query_tokens
    rows = [[image_token] * queries + r[k.bool()].tolist() for r, k in zip(batch["input_ids"], batch["attention_mask"])]
    width = max(map(len, rows))
    hf_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    hf_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = stage2.to(device, dtype), hf2.to(device, dtype)
        x = images[:2].to(device, dtype)
        with torch.no_grad():
            logits = a(**{k: v.to(device) for k, v in batch.items()}, vision_tokens=a.vision(x).to(dtype)).logits.float()
            hf_logits = b(pixel_values=x, input_ids=hf_ids.to(device), attention_mask=hf_mask.to(device)).logits[:, queries:].float()
        keep = batch["attention_mask"].to(device).bool()
        out[f"{name}_logits"] = float((logits - hf_logits)[keep].abs().max())
    out["ok"] = all(out[k] <= TOLERANCES[k] for k in TOLERANCES)
    out["tolerances"] = TOLERANCES
    return out


# ---- stage 1 ----------------------------------------------------------------------------------------------
def matmul_tflops(device: torch.device, smoke: bool) -> float:
    n = 512 if smoke else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = Clock(device)(lambda: a @ b, repeats=5 if smoke else 20)
    return 2 * n**3 / seconds / 1e12


def model_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def stage1(device: torch.device, smoke: bool) -> dict:
    clock = Clock(device)
    peak = matmul_tflops(device, smoke)
    cfg = stage1_config(smoke, "qformer.attn_impl=sdpa", "vision.precision=bf16" if device.type == "cuda" else "vision.precision=fp32")
    torch.manual_seed(0)
    model = Blip2Stage1(cfg).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    size = cfg.vision.image_size
    results: dict[str, Any] = {"matmul_tflops": peak}

    def inputs(batch: int):
        images = torch.randn(batch, 3, size, size, device=device)
        ids = torch.randint(1000 if not smoke else 5, 2000 if not smoke else 90, (batch, 32), device=device)
        ids[:, 0] = 2
        return images, ids, torch.ones_like(ids)

    def step_fns(batch: int, cached: bool, forward: Callable):
        images, ids, mask = inputs(batch)
        with torch.no_grad(), autocast(device):
            tokens = model.vision(images)

        def vit():
            with torch.no_grad(), autocast(device):
                model.vision(images)

        def fwd():
            with autocast(device):
                return forward(ids, mask, vision_tokens=tokens)

        def fwd_bwd():
            fwd().loss.backward()

        def optim():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return vit, fwd, fwd_bwd, optim

    candidates = [2, 4] if smoke else [512, 384, 256, 192, 128, 96, 64, 32]
    chosen = None
    for batch in candidates:
        try:
            _, _, fwd_bwd, optim = step_fns(batch, False, model)
            fwd_bwd()
            optim()
            clock.sync()
            chosen = batch
            break
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if chosen is None:
        raise RuntimeError(f"no batch of {candidates} fits")
    results["batch"] = chosen
    repeats = 1 if smoke else 3
    for compiled in (False, True):
        forward = torch.compile(model, backend="eager" if smoke else "inductor") if compiled else model
        vit, fwd, fwd_bwd, optim = step_fns(chosen, False, forward)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_vit = clock(vit, repeats)
        t_fwd = clock(fwd, repeats, warmup=2 if compiled else 1)
        t_fwd_bwd = clock(fwd_bwd, repeats, warmup=2 if compiled else 1)
        t_optim = clock(optim, repeats)
        flops = model_flops(vit) + 3 * model_flops(fwd)  # backward ~ 2x forward for the trained part
        step = t_vit + t_fwd_bwd + t_optim
        cached_step = t_fwd_bwd + t_optim
        key = "compiled" if compiled else "eager"
        results[key] = {
            "samples_per_s": chosen / step, "samples_per_s_cached_tokens": chosen / cached_step,
            "mfu": flops / step / (peak * 1e12), "phase_ms": {"vit_forward": 1000 * t_vit, "qformer_forward": 1000 * t_fwd,
                                                              "backward": 1000 * (t_fwd_bwd - t_fwd), "optimizer": 1000 * t_optim},
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
    return results


# ---- stage 2 ----------------------------------------------------------------------------------------------
def stage2(device: torch.device, smoke: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    clock = Clock(device)
    vision_cfg = stage1_config(smoke).vision
    out = {}
    for kind in ("opt", "t5"):
        text_config = llm_config(kind, smoke)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loader = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
        with torch.device(device):
            llm = loader.from_config(text_config, dtype=dtype).eval()
        for p in llm.parameters():
            p.requires_grad_(False)
        tokenizer = word_tokenizer(text_config.vocab_size)
        base = stage1_config(smoke)
        cfg = merge_config(Stage2ModelConfig, [{"vision": vars(vision_cfg), "qformer": vars(base.qformer)}],
                           ["llm.precision=bf16" if device.type == "cuda" else "llm.precision=fp32", "vision.checkpoint=null", "qformer.bert=null"])
        model = Blip2Stage2(cfg, llm, tokenizer).to(device)
        batch = 4 if smoke else 32
        tokens = torch.randn(batch, model.vision.num_tokens(cfg.vision.image_size), model.vision.width, device=device, dtype=dtype)
        text = lm_inputs(tokenizer, kind == "t5", ["w5 w6"] * batch, ["w7 w8 w9 w10 w11 w12"] * batch, 32)
        text = {k: v.to(device) for k, v in text.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_step():
            with autocast(device):
                model(**text, vision_tokens=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_step = clock(train_step, 1 if smoke else 3)
        model.eval()
        ids, _ = padded_prompt_ids(tokenizer, kind == "t5", ["w5"], 8)
        with torch.no_grad(), autocast(device):
            t_beam = clock(lambda: model.generate(vision_tokens=tokens, prompt="w5", num_beams=5, max_new_tokens=4 if smoke else 20), 1)
        out[kind] = {"batch": batch, "samples_per_s": batch / t_step, "captions_per_s_beam5": batch / t_beam,
                     "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                     "llm_parameters_b": sum(p.numel() for p in llm.parameters()) / 1e9}
    return out


# ---- feature extraction -------------------------------------------------------------------------------------
def features(device: torch.device, smoke: bool) -> dict:
    from transformers import Blip2ForImageTextRetrieval

    clock = Clock(device)
    cfg = stage1_config(smoke, "qformer.attn_impl=sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = Blip2Stage1(cfg).eval()
    hf = Blip2ForImageTextRetrieval(hf_retrieval_config(cfg)).eval()
    hf.load_state_dict(to_hf_retrieval(ours.state_dict()), strict=False)
    ours.to(device, dtype)
    hf.to(device, dtype)
    batch = 8 if smoke else 128
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=dtype)

    def ours_features():
        with torch.inference_mode():
            return ours.image_features(ours.encode_image(images))[1]

    def hf_features():
        with torch.inference_mode():
            vision = hf.vision_model(pixel_values=images).last_hidden_state
            query = hf.qformer(query_embeds=hf.query_tokens.expand(batch, -1, -1), encoder_hidden_states=vision).last_hidden_state
            return torch.nn.functional.normalize(hf.vision_projection(query), dim=-1)

    repeats = 1 if smoke else 5
    t_ours, t_hf = clock(ours_features, repeats), clock(hf_features, repeats)
    diff = float((ours_features().float() - hf_features().float()).abs().max())
    return {"batch": batch, "ours_images_per_s": batch / t_ours, "transformers_images_per_s": batch / t_hf,
            "speedup": t_hf / t_ours, "max_abs_difference": diff}


# ---- faiss --------------------------------------------------------------------------------------------------
def faiss_search(device: torch.device, smoke: bool) -> dict:
    import faiss

    items, per_item, dim, queries = (2000, 4, 32, 64) if smoke else (100_000, 32, 256, 1024)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((items * per_item, dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    q = data[rng.integers(0, len(data), queries)] + 0.1 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    out: dict[str, Any] = {"vectors": len(data), "queries": queries, "faiss_gpus": gpus}
    nlist = 64 if smoke else 4096
    for kind in ("flat", "ivf"):
        cpu = faiss.IndexFlatIP(dim) if kind == "flat" else faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        if kind == "ivf":
            cpu.train(data[rng.integers(0, len(data), min(len(data), 40 * nlist))])
            cpu.nprobe = 16
        cpu.add(data)
        start = time.perf_counter()
        cpu.search(q, 10 * per_item)
        out[f"{kind}_cpu_queries_per_s"] = queries / (time.perf_counter() - start)
        if gpus:
            gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
            gpu.search(q[:8], 10 * per_item)
            start = time.perf_counter()
            gpu.search(q, 10 * per_item)
            out[f"{kind}_gpu_queries_per_s"] = queries / (time.perf_counter() - start)
            out[f"{kind}_gpu_speedup"] = out[f"{kind}_gpu_queries_per_s"] / out[f"{kind}_cpu_queries_per_s"]
    if not gpus:
        out["note"] = "faiss has no GPU here (pip install faiss-gpu-cu12 for the GPU rows)"
    return out


SECTIONS = {"parity": parity, "stage1": stage1, "stage2": stage2, "features": features, "faiss": faiss_search}


def markdown(results: dict) -> str:
    lines = [f"# GPU suite: {results['device']}", "", f"torch {results['torch']}, {results['mode']} mode, {results['seconds']:.0f} s", ""]
    for name, section in results["sections"].items():
        lines += [f"## {name} ({section['seconds']:.1f} s)", ""]
        if "error" in section:
            lines += [f"error: {section['error']}", ""]
            continue
        lines += ["| measure | value |", "|---|---|"]
        for key, value in _flat(section["result"]):
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        lines.append("")
    return "\n".join(lines)


def _flat(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on CPU: checks that every section runs")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "mode": "smoke" if args.smoke else "full", "sections": {}}
    started = time.perf_counter()
    for name in args.sections:
        start = time.perf_counter()
        try:
            results["sections"][name] = {"result": SECTIONS[name](device, args.smoke)}
        except Exception as err:  # one section's failure must not lose the others' figures
            results["sections"][name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        results["sections"][name]["seconds"] = time.perf_counter() - start
        print(f"{name}: {time.perf_counter() - start:.1f} s", "error" if "error" in results["sections"][name] else "ok", flush=True)
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0 if all("error" not in s for s in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
