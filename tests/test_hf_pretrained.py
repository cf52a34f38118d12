"""Hugging Face directories both ways: what `save_pretrained` writes, transformers' own `from_pretrained` opens
and gives our scores, logits and captions (stage 1; stage 2 with OPT and T5); `from_pretrained` of it gives
our model back; encoders HF cannot hold are refused with the way out."""

import pytest
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from conftest import redraw_, text_batch, tiny_model
from lavis_lite import from_pretrained, save_pretrained
from lavis_lite.config import ConfigError
from lavis_lite.interop.hf_pretrained import save_qformer
from lavis_lite.models.factory import create_stage2_model
from lavis_lite.models.llm import lm_inputs, padded_prompt_ids
from test_parity_stage2 import CAPTIONS, PROMPTS, llm_dirs, redraw_all_  # noqa: F401  (llm_dirs: a fixture)
from tiny_llm import PAD


def test_stage1_directory_opens_in_transformers_and_comes_back(images, tmp_path):
    ours = tiny_model().eval()
    redraw_(ours)
    save_pretrained(ours, tmp_path / "blip2-itm")
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "blip2-itm").eval()
    ids, mask = text_batch(4, 7, 100, [7, 3, 5, 1])
    with torch.no_grad():
        _, image_feats, _ = ours.image_features(ours.encode_image(images))
        _, text_feats = ours.text_features(ids, mask)
        sim = ours.itc_similarity(image_feats, text_feats)
        hf_sim = torch.stack([hf(pixel_values=img[None].expand(4, -1, -1, -1), input_ids=ids, attention_mask=mask).logits_per_image[0] for img in images])
        itm = ours.itm_logits(ours.encode_image(images), ids, mask)
        hf_itm = hf(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
    assert sim.std() > 1e-2 and itm.std() > 1e-2
    torch.testing.assert_close(sim, hf_sim, atol=1e-5, rtol=0)
    torch.testing.assert_close(itm, hf_itm, atol=1e-5, rtol=0)
    back, _ = from_pretrained(tmp_path / "blip2-itm", ("vision.precision=fp32",))
    state, again = ours.state_dict(), back.state_dict()
    carried = [k for k in state if k != "temp" and not k.startswith("qformer.lm_head.")]
    assert all(torch.equal(state[k], again[k]) for k in carried)


def hf_inputs(ours, image_token: int, prompts, captions=None):
    """HF's input_ids for our text: num_query_tokens image tokens before each row, padded (left for generation)."""
    queries = ours.cfg.qformer.num_query_tokens
    if captions is None:
        ids, mask = padded_prompt_ids(ours.tokenizer, ours.is_encoder_decoder, prompts, ours.cfg.max_text_len)
    else:
        batch = lm_inputs(ours.tokenizer, ours.is_encoder_decoder, prompts, captions, ours.cfg.max_text_len)
        ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [[image_token] * queries + row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    width = max(map(len, rows))
    left = captions is None and not ours.is_encoder_decoder
    pad = lambda row, v: ([v] * (width - len(row)) + row) if left else (row + [v] * (width - len(row)))  # noqa: E731
    return torch.tensor([pad(r, PAD) for r in rows]), torch.tensor([pad([1] * len(r), 0) for r in rows])


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_directory_opens_in_transformers_with_the_same_logits_and_captions(llm_dirs, images, tmp_path, kind):  # noqa: F811
    torch.manual_seed(0)
    ours = create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs[kind]}"]).eval()
    redraw_all_(ours, ours.llm)
    out = save_pretrained(ours, tmp_path / "blip2-llm")
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.num_query_tokens == ours.cfg.qformer.num_query_tokens
    image_token = hf.config.image_token_index
    assert processor.tokenizer.convert_ids_to_tokens(image_token) == "<image>"
    batch = lm_inputs(ours.tokenizer, ours.is_encoder_decoder, PROMPTS, CAPTIONS, ours.cfg.max_text_len)
    ids, mask = hf_inputs(ours, image_token, PROMPTS, CAPTIONS)
    queries = ours.cfg.qformer.num_query_tokens
    with torch.no_grad():
        logits = ours(**batch, images=images).logits
        if ours.is_encoder_decoder:
            hf_logits = hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=batch["labels"]).logits
        else:
            hf_logits = hf(pixel_values=images, input_ids=ids, attention_mask=mask).logits[:, queries:]
    assert logits.std() > 0.1
    torch.testing.assert_close(logits, hf_logits[..., : logits.shape[-1]], atol=1e-4, rtol=0)  # HF's: + <image>
    tokenizer = ours.tokenizer
    for settings in (dict(num_beams=1), dict(num_beams=3)):
        captions = ours.generate(images, prompt=PROMPTS, max_new_tokens=8, min_new_tokens=1, **settings)
        gen_ids, gen_mask = hf_inputs(ours, image_token, PROMPTS)
        generated = hf.generate(pixel_values=images, input_ids=gen_ids, attention_mask=gen_mask, do_sample=False,
                                max_new_tokens=8, min_new_tokens=1, **settings)
        if not ours.is_encoder_decoder:
            generated = generated[:, gen_ids.shape[1]:]
        expected = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        assert all(expected) and captions == expected, (settings, captions, expected)
    back = from_pretrained(out, ("vision.precision=fp32",))
    with torch.no_grad():
        torch.testing.assert_close(back(**batch, images=images).logits[..., : logits.shape[-1]], logits, atol=1e-5, rtol=0)


def test_an_encoder_hf_cannot_hold_is_refused_and_its_qformer_side_saved(tmp_path):
    model = tiny_model()
    model.cfg.vision.kind = "timm"  # as a timm CNN's config says
    with pytest.raises(ConfigError, match="save_qformer"):
        save_pretrained(model, tmp_path / "hf")
    out = save_qformer(model, tmp_path / "qformer")
    assert (out / "qformer.safetensors").is_file() and (out / "lavis_lite_config.json").is_file()


def test_the_stop_text_ends_training_captions_and_generation_and_travels_with_the_export(llm_dirs, images, tmp_path):  # noqa: F811
    """`llm.stop_text` (BLIP-2 OPT's "\\n") replaces EOS at the end of training captions and as the stop token; the
    HF export writes it as the generation config's eos_token_id, and an import reads it back from there."""
    ours = create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs['opt']}", "llm.stop_text=':'"]).eval()
    colon = ours.tokenizer.convert_tokens_to_ids(":")
    assert ours.stop_token_id == colon != ours.tokenizer.eos_token_id
    batch = lm_inputs(ours.tokenizer, False, ["a photo of"], ["a red circle"], 24, ours.stop_token_id)
    assert batch["labels"][0, -1] == colon
    out = save_pretrained(ours, tmp_path / "hf")
    assert Blip2ForConditionalGeneration.from_pretrained(out).generation_config.eos_token_id == colon
    assert from_pretrained(out).cfg.llm.stop_text == ":"
    with pytest.raises(ConfigError, match="is 2 tokens"):
        create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs['opt']}", "llm.stop_text=red circle"])
