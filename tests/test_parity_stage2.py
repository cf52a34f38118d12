"""Our stage-2 model equals transformers' Blip2ForConditionalGeneration given the same weights (OPT and T5)."""

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from lavis_lite.interop.convert_hf import (
    HF_TEXT_FFN,
    from_hf_conditional_generation,
    hf_conditional_generation_config,
    to_hf_conditional_generation,
)
from lavis_lite.models.factory import create_stage2_model
from lavis_lite.models.llm import IGNORE, lm_inputs, padded_prompt_ids
from conftest import redraw_
from tiny_llm import PAD, VOCAB, save_tiny_llm

KINDS = ["opt", "t5"]
IMAGE_TOKEN = VOCAB - 1  # HF's query placeholder: the vocabulary's last word, which no text below uses
PROMPTS = ["a photo of", "", "question : what colour is the star ? answer :", "a picture with"]
CAPTIONS = ["a red circle", "the small blue square on the left and a green star", "yellow", "a large cross"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {kind: save_tiny_llm(kind, root) for kind in KINDS}


def redraw_all_(model: torch.nn.Module, llm: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight; a T5's embeddings with std 1 as T5 draws them (its tied output layer scales by
    d_model ** -0.5: smaller embeddings give near-constant logits and generations)."""
    redraw_(model, seed, std=0.3)
    if llm.config.is_encoder_decoder:
        redraw_(llm.get_input_embeddings(), seed, std=1.0)


def build_pair(llm_dir):
    """Our tiny stage-2 model with every weight re-drawn, and the HF model holding the same weights."""
    torch.manual_seed(0)
    ours = create_stage2_model("tiny-stage2", [f"llm.path={llm_dir}"]).eval()
    redraw_all_(ours, ours.llm)
    hf = Blip2ForConditionalGeneration(hf_conditional_generation_config(ours.cfg, ours.llm.config, IMAGE_TOKEN)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_conditional_generation(ours.state_dict()), strict=False)
    text_ffn = {k for k in hf.state_dict() if HF_TEXT_FFN.match(k)}
    assert not unexpected and text_ffn and set(missing) == text_ffn, (missing, unexpected)
    return ours, hf


def hf_layout(ids, mask, queries: int, left: bool):
    """HF's input_ids for the same text: `queries` image tokens before each row's tokens, padding outside."""
    rows = [[IMAGE_TOKEN] * queries + row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    width = max(len(r) for r in rows)

    def pad(row: list, value: int) -> list:
        fill = [value] * (width - len(row))
        return fill + row if left else row + fill

    return torch.tensor([pad(r, PAD) for r in rows]), torch.tensor([pad([1] * len(r), 0) for r in rows])


def text_batch(ours) -> dict:
    """Training text of PROMPTS and CAPTIONS as `lm_inputs` lays it out for our model's LLM."""
    batch = lm_inputs(ours.tokenizer, ours.is_encoder_decoder, PROMPTS, CAPTIONS, ours.cfg.max_text_len)
    assert (batch["input_ids"] != IMAGE_TOKEN).all() and (batch["labels"] != IMAGE_TOKEN).all()
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "rows of different lengths (padding)"
    assert (batch["labels"] == IGNORE).any()
    if not ours.is_encoder_decoder:  # the word tokenizer adds no BOS: the empty prompt's caption starts the text
        assert (batch["labels"][:, 0] != IGNORE).any()
    return batch


def hf_scores(hf, ours, images, batch):
    """HF's loss and its logits at our positions (decoder-only: the text positions after the queries)."""
    queries = ours.cfg.qformer.num_query_tokens
    ids, mask = hf_layout(batch["input_ids"], batch["attention_mask"], queries, left=False)
    labels = batch["labels"]
    if ours.is_encoder_decoder:
        out = hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out.logits
    # Labels over the whole input, none on the queries: the last query predicts the first text token. (With
    # text-only labels transformers 5.23 drops that prediction, and fails on its non-contiguous slice
    # `logits[:, -labels.size(1):]` in ForCausalLMLoss's `view`.)
    labels = torch.cat([labels.new_full((len(labels), queries), IGNORE), labels], dim=1)
    out = hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels)
    return out.loss, out.logits[:, queries:]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_loss_match_hf(images, llm_dirs, kind):
    ours, hf = build_pair(llm_dirs[kind])
    batch = text_batch(ours)
    with torch.no_grad():
        out = ours(**batch, images=images)
        hf_loss, hf_logits = hf_scores(hf, ours, images, batch)
    assert out.logits.shape == hf_logits.shape
    assert out.logits.std() > 0.1 and 0.5 < out.loss < 20, "scores must vary for the comparison to mean anything"
    torch.testing.assert_close(out.logits, hf_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, hf_loss, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_hf(images, llm_dirs, kind):
    ours, hf = build_pair(llm_dirs[kind])
    tokenizer = ours.tokenizer
    ids, mask = padded_prompt_ids(tokenizer, ours.is_encoder_decoder, PROMPTS, ours.cfg.max_text_len)
    hf_ids, hf_mask = hf_layout(ids, mask, ours.cfg.qformer.num_query_tokens, left=not ours.is_encoder_decoder)
    settings = dict(num_beams=1, max_new_tokens=8, min_new_tokens=1)
    captions = ours.generate(images, prompt=PROMPTS, **settings)
    out = hf.generate(pixel_values=images, input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    if not ours.is_encoder_decoder:
        out = out[:, hf_ids.shape[1]:]  # HF's decoder-only generate returns the prompt too
    expected = [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert all(expected) and len(set(expected)) > 1, expected
    assert captions == expected


def test_round_trips_are_the_identity(llm_dirs):
    for kind in KINDS:
        ours, hf = build_pair(llm_dirs[kind])
        state = ours.state_dict()
        back = from_hf_conditional_generation(to_hf_conditional_generation(state))
        assert set(back) == set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)
        hf_state = hf.state_dict()
        carried = {k for k in hf_state if not HF_TEXT_FFN.match(k)}
        again = to_hf_conditional_generation(from_hf_conditional_generation(hf_state))
        assert set(again) == carried
        assert all(torch.equal(again[k], hf_state[k]) for k in carried)


def test_tied_llm_weights_stay_tied(llm_dirs):
    """The LLM's output layer shares its input embedding: one tensor under both names, in both layouts."""
    ours, hf = build_pair(llm_dirs["opt"])
    converted = to_hf_conditional_generation(ours.state_dict())
    embed, head = "language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight"
    assert converted[head].data_ptr() == converted[embed].data_ptr()
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    torch.testing.assert_close(hf.get_output_embeddings().weight, ours.llm.get_input_embeddings().weight, atol=0, rtol=0)
    back = from_hf_conditional_generation(hf.state_dict())
    assert back["llm.lm_head.weight"].data_ptr() == back["llm.model.decoder.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_hf_weights_load_into_ours(images, llm_dirs, kind):
    """HF -> ours: every weight of ours comes from HF (strict load), and ours then scores like HF."""
    ours, hf = build_pair(llm_dirs[kind])
    redraw_all_(hf, hf.language_model, seed=1)
    batch = text_batch(ours)
    with torch.no_grad():
        hf_loss, hf_logits = hf_scores(hf, ours, images, batch)
        assert not torch.allclose(ours(**batch, images=images).logits, hf_logits, atol=1e-2)
        ours.load_state_dict(from_hf_conditional_generation(hf.state_dict()), strict=True)
        out = ours(**batch, images=images)
    torch.testing.assert_close(out.logits, hf_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, hf_loss, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_with_repetition_penalty_matches_hf(images, llm_dirs, kind):
    """Beam search with a repetition penalty. HF's decoder-only generate penalises the prompt's tokens too (they
    are in its input_ids); ours generates from input embeddings and penalises only what it generated, as LAVIS
    does: the two agree on empty prompts, which is what is compared for the decoder-only LLM."""
    ours, hf = build_pair(llm_dirs[kind])
    tokenizer = ours.tokenizer
    prompts = PROMPTS if ours.is_encoder_decoder else [""] * len(PROMPTS)
    ids, mask = padded_prompt_ids(tokenizer, ours.is_encoder_decoder, prompts, ours.cfg.max_text_len)
    hf_ids, hf_mask = hf_layout(ids, mask, ours.cfg.qformer.num_query_tokens, left=not ours.is_encoder_decoder)
    settings = dict(num_beams=3, max_new_tokens=8, min_new_tokens=1, repetition_penalty=1.5)
    captions = ours.generate(images, prompt=prompts, **settings)
    out = hf.generate(pixel_values=images, input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    if not ours.is_encoder_decoder:
        out = out[:, hf_ids.shape[1]:]
    expected = [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert all(expected) and captions == expected, (captions, expected)
