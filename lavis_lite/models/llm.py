"""The frozen language model of stage 2: loading (local directory or GGUF) and its text layouts.

A GGUF file is dequantised once into a `save_pretrained` copy under `cache_dir` (written atomically,
keyed by the file's name, size and mtime), so that later loads take about a second instead of a dequantisation.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lavis_lite.config import ConfigError, LanguageModelConfig
from lavis_lite.io import recover_dir, replace_dir, staging_dir
from lavis_lite.models.losses import IGNORE
from lavis_lite.precision import resolve_dtype

log = logging.getLogger("lavis_lite.models.llm")



def dequantised_copy(gguf: Path, cache_dir: Path) -> Path:
    """A `save_pretrained` directory of a GGUF model (fp32 weights and its tokenizer), made once."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir / f"{gguf.stem}-{key}"
    recover_dir(target)
    if (target / "config.json").is_file():
        return target
    log.info("dequantising %s once into %s", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The dequantised weights are plain fp32; transformers refuses to save a model still marked as GGUF-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)
    return target


def load_language_model(
    cfg: LanguageModelConfig, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen LLM (eval mode, no gradients, in `llm.precision`) and its tokenizer."""
    if not cfg.path:
        raise ConfigError("llm.path is empty: give a transformers model directory or a .gguf file")
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"llm.path={path} does not exist: give a transformers model directory or a .gguf file")
    if path.is_file() and path.suffix != ".gguf":
        raise ConfigError(f"llm.path={path} is a file but not a .gguf: give a transformers model directory or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"llm.path={path} holds no config.json: give a transformers model directory or a .gguf file")
    if path.suffix == ".gguf":
        if cfg.cache_dir is None:
            raise ConfigError(f"llm.path={path} is a GGUF file: set llm.cache_dir for its dequantised copy")
        path = dequantised_copy(path, Path(cfg.cache_dir))
    config = AutoConfig.from_pretrained(path)
    loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    dtype = resolve_dtype(cfg.precision, device, "llm.precision")
    model = loader.from_pretrained(path, dtype=dtype, attn_implementation=_attn_implementation(cfg, device)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    return freeze(model), tokenizer


def _attn_implementation(cfg: LanguageModelConfig, device: torch.device | str) -> Optional[str]:
    """`llm.attn_impl`: auto is transformers' default on GPUs and eager attention on CPUs, where SDPA's bf16
    backward measured several times slower (SmolLM2 step: 0.64 s eager against 0.76 s SDPA, bf16)."""
    if cfg.attn_impl != "auto":
        return cfg.attn_impl
    return None if torch.device(device).type == "cuda" else "eager"


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode (no dropout) and no gradients: the LLM never trains."""
    model.eval()
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """The LM head reads the kept positions (`logits_to_keep`), a strided slice of the hidden states; in bf16 on
    CPU such a 3-D input makes matmul copy the whole vocabulary matrix once per row (measured 0.4 s of a 1.3 s
    SmolLM2 step). A contiguous copy of the few kept positions costs nothing in comparison."""
    return (args[0].contiguous(), *args[1:])


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """A pad token (the EOS where the LLM has none); layouts below add BOS/EOS themselves."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _pad(rows: list[list[int]], value: int, left: bool = False) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens a tokenizer puts before any text by itself (OPT, Llama: BOS; SmolLM2, GPT-2: none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []


def causal_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_len: int) -> list[list[int]]:
    """`[BOS] prompt` token ids of a decoder-only LLM (what follows the soft prompt), unpadded; BOS only
    where the tokenizer adds one itself."""
    specials = leading_special_ids(tokenizer)
    return [(specials + ids)[:max_len] for ids in _ids(tokenizer, prompts)]


def _prompt_and_target(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` and of `target` as it continues the prompt after a space: the joined text is
    tokenised once (BPE vocabularies attach the space to the next word), then cut after the prompt."""
    if not prompt:
        return [], _ids(tokenizer, [target])[0]
    prompt_ids, joined = _ids(tokenizer, [prompt, f"{prompt} {target}"])
    if joined[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joined[len(prompt_ids) :]
    return prompt_ids, _ids(tokenizer, [f" {target}"])[0]


def stop_token_id(tokenizer: PreTrainedTokenizerBase, stop_text: Optional[str]) -> int:
    """The id of the one token `stop_text` is (ConfigError otherwise); the tokenizer's EOS for None."""
    if stop_text is None:
        return tokenizer.eos_token_id
    ids = tokenizer(stop_text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(f"llm.stop_text={stop_text!r} is {len(ids)} tokens for this tokenizer: give text that is one token")
    return ids[0]


def causal_lm_inputs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str], max_len: int, stop_id: Optional[int] = None
) -> dict[str, Tensor]:
    """Decoder-only training text: `[BOS] prompt target [STOP]`, right-padded; labels only on `target [STOP]`
    (`stop_id`: default the tokenizer's EOS)."""
    stop = tokenizer.eos_token_id if stop_id is None else stop_id
    specials = leading_special_ids(tokenizer)
    rows, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids, target_ids = _prompt_and_target(tokenizer, prompt, target)
        head = specials + prompt_ids
        full = (head + target_ids + [stop])[:max_len]
        rows.append(full)
        labels.append([IGNORE] * len(head) + full[len(head) :])
    return {
        "input_ids": _pad(rows, tokenizer.pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0),
        "labels": _pad(labels, IGNORE),
    }


def seq2seq_lm_inputs(
    tokenizer: PreTrainedTokenizerBase, sources: list[str], targets: list[str], max_len: int, stop_id: Optional[int] = None
) -> dict[str, Tensor]:
    """Encoder-decoder training text: the encoder reads `source [EOS]` after the queries, the decoder
    predicts `target [STOP]` (`stop_id`: default the tokenizer's EOS)."""
    eos = [tokenizer.eos_token_id]
    sources_ids = [(ids + eos)[-max_len:] for ids in _ids(tokenizer, sources)]
    target_ids = [(ids + [eos[0] if stop_id is None else stop_id])[:max_len] for ids in _ids(tokenizer, targets)]
    return {
        "input_ids": _pad(sources_ids, tokenizer.pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in sources_ids], 0),
        "labels": _pad(target_ids, IGNORE),
    }


def split_prefix(caption: str, rng: random.Random) -> tuple[str, str]:
    """BLIP-2's prefix LM for encoder-decoder LLMs: a caption cut at a random word into (prefix, suffix);
    the suffix keeps at least one word."""
    words = caption.split()
    cut = rng.randrange(len(words)) if words else 0
    return " ".join(words[:cut]), " ".join(words[cut:])


def lm_inputs(
    tokenizer: PreTrainedTokenizerBase,
    is_encoder_decoder: bool,
    prompts: list[str],
    targets: list[str],
    max_len: int,
    stop_id: Optional[int] = None,
) -> dict[str, Tensor]:
    """Training text for either LLM family (see `causal_lm_inputs`, `seq2seq_lm_inputs`)."""
    build = seq2seq_lm_inputs if is_encoder_decoder else causal_lm_inputs
    return build(tokenizer, prompts, targets, max_len, stop_id)


def padded_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, is_encoder_decoder: bool, prompts: list[str], max_len: int
) -> tuple[Tensor, Tensor]:
    """Generation prompts: decoder-only `[BOS] prompt` left-padded; encoder-decoder `prompt [EOS]` right-padded."""
    if is_encoder_decoder:
        rows = [(ids + [tokenizer.eos_token_id])[-max_len:] for ids in _ids(tokenizer, prompts)]
        return _pad(rows, tokenizer.pad_token_id), _pad([[1] * len(r) for r in rows], 0)
    rows = causal_prompt_ids(tokenizer, prompts, max_len)
    return _pad(rows, tokenizer.pad_token_id, left=True), _pad([[1] * len(r) for r in rows], 0, left=True)


__all__ = [
    "IGNORE",
    "causal_lm_inputs",
    "dequantised_copy",
    "freeze",
    "lm_inputs",
    "load_language_model",
    "padded_prompt_ids",
    "seq2seq_lm_inputs",
    "split_prefix",
]

