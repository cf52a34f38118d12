"""Stage-2 training step and batched caption generation on this device: ours (`Blip2Stage2`) against
transformers' `Blip2ForConditionalGeneration` holding the same weights (`lavis_lite.interop.convert_hf`), same run.

    .venv/bin/python benchmarks/stage2_step.py [--llm smollm2] [--qformer minilm] [--batch 16] [--dtype fp32]
        [--vision-tokens] [key=value ...]        # key=value: overrides of our stage-2 model config

Everything is built here with random weights, nothing is downloaded: the LLM from the shapes of `--llm`
(saved to a temporary directory and loaded by `create_stage2_model`, as training loads it), our small
EVA-style ViT (vision kind "vit", the one HF's `Blip2VisionModel` can hold) of `--vision`'s token shape,
and the Q-Former of `--qformer`. The text is a word-level tokenizer's (tests/tiny_llm.py): every row holds
exactly `--text-len` LLM tokens, so both models see the same batch of the same length.

(a) Training step: forward + backward + AdamW step on the trainable parts (ln_vision, Q-Former, queries,
    the Linear), the LLM frozen and in eval mode in both, the same autocast. Samples/s from the median of
    `--repeats` steps after `--warmup`, ours and HF's interleaved; peak memory from one more step each: the
    model's weights and optimizer state plus the step's peak above them (CUDA: max_memory_allocated; CPU:
    the process's peak RSS, reset through /proc/self/clear_refs, else sampled with psutil, else omitted).
    `--vision-tokens`: both start from the same precomputed encoder tokens (as training from the feature
    cache does). HF's forward takes no encoder tokens, so its vision tower is swapped for one that passes
    them through its post_layernorm (= our ln_vision): the rest of HF's forward runs as it is.
(b) Generation: captions/s of `generate` (greedy and beam search), from pixels in both (HF's `generate`
    takes no encoder tokens), the same prompts; random LLMs never stop early, and min_new_tokens =
    max_new_tokens makes both produce exactly `--max-new-tokens` tokens. The first (warm-up) call of each
    checks that both produce the same tokens.

The big presets (opt-2.7b, flan-t5-xl) hold two copies of the LLM (ours and HF's): meant for a GPU, bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny_llm.py: the word-level tokenizer

from lavis_lite.config import Stage2ModelConfig, merge_config  # noqa: E402
from lavis_lite.interop.convert_hf import (  # noqa: E402
    HF_TEXT_FFN, hf_conditional_generation_config, to_hf_conditional_generation,
)
from lavis_lite.models.factory import create_stage2_model  # noqa: E402
from lavis_lite.models.llm import IGNORE, lm_inputs, padded_prompt_ids  # noqa: E402
from lavis_lite.models.qformer import resolve_attn_impl  # noqa: E402
from lavis_lite.training.train_loop import param_groups  # noqa: E402
from tests.tiny_llm import BOS, EOS, PAD, WORDS, tiny_llm, word_tokenizer  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stage2" / "demo.yaml"
GiB = 2**30


# ---- presets ---------------------------------------------------------------------------------------------
def llm_config(preset: str):
    """(transformers config, model class) of an `--llm` preset: the real model's shapes, our token ids."""
    from transformers import (
        LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration,
    )

    ids = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if preset == "smollm2":  # HuggingFaceTB/SmolLM2-135M(-Instruct)
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, tie_word_embeddings=True, **ids), LlamaForCausalLM
    if preset == "opt-2.7b":  # facebook/opt-2.7b
        return OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                         num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                         do_layer_norm_before=True, enable_bias=True, **ids), OPTForCausalLM
    if preset == "flan-t5-xl":  # google/flan-t5-xl
        return T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                        num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                        layer_norm_epsilon=1e-6, decoder_start_token_id=PAD, **ids), T5ForConditionalGeneration
    raise ValueError(preset)


LLM_PRESETS = {"smollm2": "Llama, SmolLM2-135M's shapes", "opt-2.7b": "OPT-2.7B's shapes",
               "flan-t5-xl": "T5, FlanT5-XL's shapes", "tiny": "tests/tiny_llm.py's tiny Llama",
               "tiny-opt": "tests/tiny_llm.py's tiny OPT", "tiny-t5": "tests/tiny_llm.py's tiny T5"}

QFORMER_PRESETS = {  # the demo's (all-MiniLM-L6-v2), the paper's (bert-base), configs/stage2/tiny.yaml's
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, num_query_tokens=16),
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, num_query_tokens=32),
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=4),
}

# The small EVA-style ViT (vision kind "vit"), shaped to give the token shape of a real encoder; 2 blocks.
VISION_PRESETS = {
    # the demo's EfficientNet-Lite0 at 128 px: 16 (+ cls) tokens of 1280
    "demo": dict(image_size=128, patch_size=32, width=1280, depth=2, heads=16, mlp_dim=5120),
    # the paper's EVA ViT-g/14 at 224 px: 256 (+ cls) tokens of 1408
    "paper": dict(image_size=224, patch_size=14, width=1408, depth=2, heads=16, mlp_dim=6144),
    "tiny": dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64),  # configs/stage2/tiny.yaml
}


def build_llm(preset: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A random LLM of `preset` in `dtype`, initialised on `device` (fast for the big ones on a GPU)."""
    if preset.startswith("tiny"):
        return tiny_llm({"tiny": "llama", "tiny-opt": "opt", "tiny-t5": "t5"}[preset]).to(dtype)
    config, cls = llm_config(preset)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype).eval()


def llm_param_count(preset: str) -> int:
    if preset.startswith("tiny"):
        return sum(p.numel() for p in build_llm(preset, torch.float32, torch.device("cpu")).parameters())
    config, cls = llm_config(preset)
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def available_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


def log(message: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"[stage2_step] {message}", file=sys.stderr, flush=True)


# ---- memory and timing -----------------------------------------------------------------------------------
def _proc_status(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that an RSS baseline holds live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status("VmHWM") is not None


class _RssSampler:
    """The peak RSS over a block, sampled by a thread every 2 ms (psutil), where VmHWM cannot be reset."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "_RssSampler":
        self.base = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def step_peak(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """Bytes allocated at the peak of one call of `fn` above what was allocated before it, and how measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    _trim_heap()
    if _reset_rss_peak():
        base = _proc_status("VmRSS")
        fn()
        return max(0, _proc_status("VmHWM") - base), "peak RSS (VmHWM, reset via /proc/self/clear_refs)"
    try:
        sampler = _RssSampler()
    except ImportError:
        return None, "not measured (no /proc/self/clear_refs, no psutil)"
    with sampler:
        fn()
    return max(0, sampler.peak - sampler.base), "peak RSS (sampled every 2 ms with psutil)"


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The model's weights and buffers plus the optimizer's state (what a step's peak sits on)."""
    state = [v for s in optimizer.state.values() for v in s.values()]
    return tensor_bytes([*model.parameters(), *model.buffers()]) + tensor_bytes(state)


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device) -> dict[str, float]:
    """Median seconds of each function over `repeats` calls after `warmup`, the functions taking turns."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        # ABBA order: whichever runs first in a round is not always the same one (CPU caches, thread wake-up)
        for name, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- the two models ----------------------------------------------------------------------------------------
class _GivenTokens(nn.Module):
    """Stands in for HF's vision tower in --vision-tokens mode: the given encoder tokens through its post_layernorm."""

    def __init__(self, post_layernorm: nn.Module) -> None:
        super().__init__()
        self.post_layernorm = post_layernorm

    def forward(self, pixel_values: Tensor, **_):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=self.post_layernorm(pixel_values))


def build_hf(ours, cfg: Stage2ModelConfig, image_token: int, llm_dtype: torch.dtype, vision_dtype: torch.dtype,
             device: torch.device):
    """transformers' Blip2ForConditionalGeneration with our weights (converted), dtypes placed like ours."""
    from transformers import Blip2ForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = hf_conditional_generation_config(cfg, ours.llm.config, image_token)
    config.qformer_config.hidden_dropout_prob = cfg.qformer.dropout
    config.qformer_config.attention_probs_dropout_prob = cfg.qformer.attention_dropout
    with torch.device(device), no_init_weights():  # every weight is loaded below: no random init
        hf = Blip2ForConditionalGeneration._from_config(config, dtype=llm_dtype)
    # Like ours: the LLM in its precision, the frozen ViT in the vision precision, the trained parts in fp32.
    hf.vision_model.to(vision_dtype)
    for module in (hf.qformer, hf.language_projection, hf.vision_model.post_layernorm):
        module.float()
    hf.query_tokens.data = hf.query_tokens.data.float()
    missing, unexpected = hf.load_state_dict(to_hf_conditional_generation(ours.state_dict()), strict=False)
    unused = [k for k in missing if HF_TEXT_FFN.match(k)]
    if unexpected or len(unused) != len(missing):
        raise RuntimeError(f"HF model does not take our weights: missing {sorted(set(missing) - set(unused))[:5]}, "
                           f"unexpected {unexpected[:5]}")
    hf.requires_grad_(False)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if HF_TEXT_FFN.match(name):
                p.zero_()  # the Q-Former's text FFNs: no text rows in stage 2, never used; not trained
            elif name.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm.")):
                p.requires_grad_(True)
    return hf


def hf_train(hf) -> None:
    """HF's model in training mode, its frozen LLM and ViT in eval mode (as ours keeps them: no LLM dropout)."""
    hf.train()
    hf.language_model.eval()
    hf.vision_model.eval()


def with_image_tokens(ids: Tensor, mask: Tensor, image_token: int, count: int, left_padded: bool):
    """HF's input_ids: `count` placeholder tokens where the soft prompts go (after any left padding)."""
    batch, length = ids.shape
    placeholders = torch.full((batch, count), image_token, dtype=ids.dtype, device=ids.device)
    ones = mask.new_ones(batch, count)
    if not left_padded:
        return torch.cat([placeholders, ids], 1), torch.cat([ones, mask], 1)
    rows, masks = [], []
    for row, m in zip(ids, mask):
        pads = int((m == 0).sum())
        rows.append(torch.cat([row[:pads], placeholders[0], row[pads:]]))
        masks.append(torch.cat([m[:pads], ones[0], m[pads:]]))
    return torch.stack(rows), torch.stack(masks)


def training_text(tokenizer, encoder_decoder: bool, batch: int, text_len: int, prompt: str, max_len: int,
                  gen: torch.Generator) -> dict[str, Tensor]:
    """A batch laid out as training lays it out, every row `text_len` LLM tokens in all (prompt included)."""
    prompt_words = len(prompt.split())
    fixed = 2 + prompt_words  # decoder-only: BOS and EOS; encoder-decoder: an EOS after source and target
    words = text_len - fixed
    if words < 2:
        raise SystemExit(f"--text-len {text_len} leaves no caption after the prompt and special tokens: raise it")

    def sentence(n: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=gen).tolist())

    if not encoder_decoder:
        return lm_inputs(tokenizer, False, [prompt] * batch, [sentence(words) for _ in range(batch)], max_len)
    # BLIP-2's prefix LM: the encoder reads `prompt prefix [EOS]`, the decoder predicts `suffix [EOS]`.
    prefix = words // 2
    sources = [f"{prompt} {sentence(prefix)}".strip() if prefix else prompt for _ in range(batch)]
    return lm_inputs(tokenizer, True, sources, [sentence(words - prefix) for _ in range(batch)], max_len)


# ---- main --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", choices=list(LLM_PRESETS), default="smollm2",
                        help="; ".join(f"{k}: {v}" for k, v in LLM_PRESETS.items()) + " (default: smollm2)")
    parser.add_argument("--qformer", choices=list(QFORMER_PRESETS), default=None,
                        help="minilm: the demo's (384 wide, 6 layers, 16 queries); bert-base: the paper's "
                             "(768, 12 layers, 32 queries); tiny (default: tiny for tiny LLMs, else minilm)")
    parser.add_argument("--vision", choices=list(VISION_PRESETS), default=None,
                        help="token shape of the small ViT: demo (17 x 1280), paper (257 x 1408), tiny "
                             "(default: tiny for tiny LLMs, else demo)")
    parser.add_argument("--batch", type=int, default=None,
                        help="training batch (default: configs/stage2/demo.yaml's data.batch_size, else 16)")
    parser.add_argument("--gen-batch", type=int, default=None, help="images per generate call (default: --batch)")
    parser.add_argument("--text-len", type=int, default=20, help="LLM tokens of each training row (default 20)")
    parser.add_argument("--prompt", default="", help="prompt before captions, in training and generation "
                                                     "(default: '', the demo's)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5], help="num_beams of the generate runs")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="LLM and ViT weights and autocast of both models (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--vision-tokens", action="store_true",
                        help="train from precomputed encoder tokens (as from the feature cache), not pixels")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="overrides of our stage-2 model config, e.g. vision.depth=4")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.llm.startswith("tiny")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if dtype_name == "bf16" and device.type == "cpu":
        print("note: bf16 on a CPU without native bf16 matmuls is emulated and very slow; fp32 is the CPU setting")
    batch = args.batch
    if batch is None:
        batch = 16
        if DEMO_CONFIG.is_file():
            from omegaconf import OmegaConf

            batch = int(OmegaConf.load(DEMO_CONFIG).data.batch_size)
    gen_batch = args.gen_batch or batch
    qformer = args.qformer or ("tiny" if tiny else "minilm")
    vision = args.vision or ("tiny" if tiny else "demo")

    # Two copies of the LLM (ours, HF's) and the rest: refuse early, with a message, where they cannot fit.
    params = llm_param_count(args.llm)
    need = int(2 * params * dtype.itemsize * 1.15) + 2 * GiB
    free = available_memory(device)
    if free is not None and need > free and not tiny:
        where = "GPU" if device.type == "cuda" else "CPU RAM"
        hint = ("this preset is meant for a GPU (bf16, the default there)" if device.type == "cpu"
                else "use a GPU with more memory")
        print(f"--llm {args.llm} ({params / 1e9:.2f}B parameters, {dtype_name}) needs about {need / GiB:.0f} GiB "
              f"for two copies of the LLM (ours and transformers') and the rest; {free / GiB:.0f} GiB of {where} "
              f"is available here: {hint}.")
        sys.exit(2)

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    image_token = tokenizer.unk_token_id  # never in our text: HF's placeholder for the soft prompts
    max_len = max(32, args.text_len)
    base = {
        "vision": {"kind": "vit", **VISION_PRESETS[vision], "precision": dtype_name},
        "qformer": {**QFORMER_PRESETS[qformer], "dropout": 0.0, "attention_dropout": 0.0},
        "llm": {"precision": dtype_name},
        "prompt": args.prompt,
        "max_text_len": max_len,
    }
    log(f"building the models: LLM {args.llm} ({params / 1e6:.0f}M parameters, {dtype_name}) on {device}")
    with tempfile.TemporaryDirectory(prefix="stage2-bench-llm-") as tmp:
        llm = build_llm(args.llm, dtype, device)
        llm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del llm
        cfg = merge_config(Stage2ModelConfig, [base, {"llm": {"path": tmp}}], args.overrides)
        ours = create_stage2_model(cfg, device=device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = build_hf(ours, cfg, image_token, ours.llm.dtype, next(ours.vision.trunk.parameters()).dtype, device)
    encoder_decoder = ours.is_encoder_decoder
    num_queries = cfg.qformer.num_query_tokens
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen).to(device)
    text = {k: v.to(device) for k, v in training_text(tokenizer, encoder_decoder, batch, args.text_len, args.prompt,
                                                      max_len, gen).items()}
    hf_ids, hf_mask = with_image_tokens(text["input_ids"], text["attention_mask"], image_token, num_queries, False)
    # Decoder-only: HF's labels span its whole input, the placeholders ignored (labels of the text alone make
    # HF slice its logits, which its fp32 loss cannot `view`); the same loss. Encoder-decoder: the targets.
    hf_labels = text["labels"] if encoder_decoder else torch.cat(
        [torch.full((batch, num_queries), IGNORE, device=device), text["labels"]], 1)
    vision_tokens = ours.encode_vision(images) if args.vision_tokens else None
    hf_vision = hf.vision_model
    hf_train_vision = _GivenTokens(hf_vision.post_layernorm) if args.vision_tokens else hf_vision

    def ours_loss() -> Tensor:
        with autocast:
            return ours(text["input_ids"], text["attention_mask"], text["labels"],
                        images=None if args.vision_tokens else images, vision_tokens=vision_tokens).loss

    def hf_loss() -> Tensor:
        hf.vision_model = hf_train_vision
        try:
            with autocast:
                return hf(pixel_values=vision_tokens if args.vision_tokens else images, input_ids=hf_ids,
                          attention_mask=hf_mask, labels=hf_labels).loss
        finally:
            hf.vision_model = hf_vision

    # Same weights, same batch -> the same loss (eval mode: no dropout anywhere).
    ours.eval()
    hf.eval()
    with torch.no_grad():
        loss_check = (ours_loss().item(), hf_loss().item())

    ours.train()
    hf_train(hf)
    opt_ours = torch.optim.AdamW(param_groups(ours, 0.05), lr=1e-4)
    opt_hf = torch.optim.AdamW(param_groups(hf, 0.05), lr=1e-4)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, hf)]

    def step(loss_fn, optimizer):
        def run():
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    steps = {"ours": step(ours_loss, opt_ours), "hf": step(hf_loss, opt_hf)}
    log(f"training step: {args.warmup} warm-up + {args.repeats} timed each, then one each for memory")
    t_train = interleaved_medians(steps, max(1, args.warmup), args.repeats, device)  # warm-up creates AdamW state
    memory, how = {}, ""
    for name, model, optimizer in (("ours", ours, opt_ours), ("hf", hf, opt_hf)):
        delta, how = step_peak(steps[name], device)
        memory[name] = None if delta is None else resident_bytes(model, optimizer) + delta
    del opt_ours, opt_hf, steps
    ours.eval()
    hf.eval()
    gc.collect()

    # ---- generation ----
    gen_rows, gen_checks = [], []
    if not args.skip_generate:
        gen_images = torch.randn(gen_batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen).to(device)
        prompt_ids, prompt_mask = padded_prompt_ids(tokenizer, encoder_decoder, [args.prompt] * gen_batch, max_len)
        g_ids, g_mask = with_image_tokens(prompt_ids.to(device), prompt_mask.to(device), image_token, num_queries,
                                          left_padded=not encoder_decoder)
        n_new = args.max_new_tokens
        common = dict(max_new_tokens=n_new, min_new_tokens=n_new)
        captured: dict[str, Tensor] = {}
        llm_generate = ours.llm.generate

        def capturing_generate(*a, **k):  # our generate returns text: keep its token ids for the check
            captured["ours"] = out = llm_generate(*a, **k)
            return out

        for beams in args.beams:
            def gen_ours(beams=beams):
                with autocast:
                    return ours.generate(images=gen_images, prompt=args.prompt, num_beams=beams, **common)

            def gen_hf(beams=beams):
                with autocast:
                    out = hf.generate(pixel_values=gen_images, input_ids=g_ids, attention_mask=g_mask, num_beams=beams,
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **common)
                captured["hf"] = out
                new = out if encoder_decoder else out[:, g_ids.shape[1]:]  # HF's decoder-only output holds the prompt
                return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

            log(f"generate, num_beams={beams}: {max(1, args.warmup)} warm-up + {args.repeats} timed each")
            ours.llm.generate = capturing_generate  # the warm-up call below, only
            gen_ours(), gen_hf()
            del ours.llm.generate
            a, b = captured["ours"], captured["hf"]
            b = b if encoder_decoder else b[:, g_ids.shape[1]:]
            skip = 1 if encoder_decoder else 0  # the decoder's start token
            same = sum(torch.equal(x, y) for x, y in zip(a, b)) if a.shape == b.shape else 0
            gen_checks.append(f"num_beams={beams}: new tokens per caption ours {a.shape[1] - skip}, "
                              f"HF {b.shape[1] - skip}; identical token ids in {same}/{len(a)} captions")
            t = interleaved_medians({"ours": gen_ours, "hf": gen_hf}, max(0, args.warmup - 1), args.repeats, device)
            label = "greedy" if beams == 1 else f"beam search, {beams} beams"
            gen_rows.append((f"generate, {label} (captions/s)", gen_batch / t["ours"], gen_batch / t["hf"]))

    # ---- report ----
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} thread(s)")
    q = cfg.qformer
    v = cfg.vision
    tokens = ours.vision.num_tokens(v.image_size)
    print(f"command: `python {shlex.join(sys.argv)}`")
    print()
    import transformers

    ours_q_attn = resolve_attn_impl(q.attn_impl, device)
    print(f"- device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          + (f"{dtype_name} (autocast; LLM and ViT weights bf16, trained parts fp32)" if dtype_name == "bf16"
             else "fp32"))
    print(f"- LLM: {args.llm} ({LLM_PRESETS[args.llm]}), {params / 1e6:.1f}M parameters, frozen, "
          f"{'encoder-decoder' if encoder_decoder else 'decoder-only'}; attention "
          f"{ours.llm.config._attn_implementation} (ours) / {hf.language_model.config._attn_implementation} (HF)")
    print(f"- Q-Former: {qformer}, {q.num_layers} layers x {q.hidden_size}, {q.num_query_tokens} queries; attention "
          f"{ours_q_attn} (ours) / {hf.qformer.config._attn_implementation} (HF). ViT: {vision}, {v.depth} blocks, "
          f"{tokens} tokens x {v.width} at {v.image_size} px. Trainable: ours {trainable[0] / 1e6:.2f}M, "
          f"HF {trainable[1] / 1e6:.2f}M parameters")
    print(f"- training: batch {batch}, {args.text_len} text tokens + {num_queries} soft prompts per row, from "
          f"{'precomputed encoder tokens' if args.vision_tokens else 'pixels'}, AdamW; generation: {gen_batch} "
          f"images per call, prompt {args.prompt!r}, exactly {args.max_new_tokens} new tokens, from pixels")
    print(f"- median of {args.repeats} after {args.warmup} warm-up, ours and HF taking turns (ABBA)")
    print()
    print("| measurement | ours (lavis_lite) | transformers Blip2ForConditionalGeneration | ours / HF |")
    print("|---|---:|---:|---:|")
    def rate(x: float) -> str:
        return f"{x:.2f}" if x >= 1 else f"{x:.3g}"

    rows = [("training step (samples/s)", batch / t_train["ours"], batch / t_train["hf"], rate),
            ("training step (ms)", 1e3 * t_train["ours"], 1e3 * t_train["hf"], "{:.1f}".format)]
    if memory["ours"] is not None:
        rows.append(("training peak memory (MiB)", memory["ours"] / 2**20, memory["hf"] / 2**20, "{:.0f}".format))
    rows += [(name, a, b, rate) for name, a, b in gen_rows]
    for name, a, b, fmt in rows:  # ours / HF: rates above 1 are ours faster, memory below 1 ours smaller
        ratio = "" if name.endswith("(ms)") else f"{a / b:.2f}x"
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {ratio} |")
    print()
    print(f"Checks (same weights, same work): training loss on the same batch (eval mode) ours {loss_check[0]:.5f}, "
          f"HF {loss_check[1]:.5f}. " + " ".join(f"Generate {c}." for c in gen_checks))
    if memory["ours"] is not None:
        print(f"Peak memory: the model's weights and AdamW state plus one step's peak above them, {how}; "
              "ours / HF below 1 is less memory.")


if __name__ == "__main__":
    main()
