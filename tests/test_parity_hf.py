"""Our ITC and ITM scores equal transformers' Blip2ForImageTextRetrieval given the same weights."""

import pytest
import torch
from transformers import Blip2ForImageTextRetrieval

from lavis_lite.interop.convert_hf import NOT_IN_HF, from_hf_retrieval, hf_retrieval_config, to_hf_retrieval
from conftest import redraw_, text_batch, tiny_config, tiny_model

LENGTHS = [7, 3, 5, 1, 7]


def build_pair(attn_impl: str = "eager"):
    ours = tiny_model(f"qformer.attn_impl={attn_impl}").eval()
    redraw_(ours)
    hf = Blip2ForImageTextRetrieval(hf_retrieval_config(tiny_config())).eval()
    missing, unexpected = hf.load_state_dict(to_hf_retrieval(ours.state_dict()), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return ours, hf


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_itc_similarity_matches_hf(images, attn_impl):
    ours, hf = build_pair(attn_impl)
    ids, mask = text_batch(len(LENGTHS), 7, 100, LENGTHS)
    with torch.no_grad():
        _, image_feats, _ = ours.image_features(ours.encode_image(images))
        _, text_feats = ours.text_features(ids, mask)
        sim = ours.itc_similarity(image_feats, text_feats)
        # HF pairs one image per text row: score every image against every text.
        hf_sim = torch.stack(
            [hf(pixel_values=img[None].expand(len(ids), -1, -1, -1), input_ids=ids, attention_mask=mask).logits_per_image[0]
             for img in images]
        )
    assert sim.shape == (len(images), len(ids))
    assert sim.std() > 1e-2, "scores must vary for the comparison to mean anything"
    torch.testing.assert_close(sim, hf_sim, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_itm_logits_match_hf(images, attn_impl):
    ours, hf = build_pair(attn_impl)
    ids, mask = text_batch(4, 7, 100, LENGTHS[:4])
    with torch.no_grad():
        logits = ours.itm_logits(ours.encode_image(images), ids, mask)
        hf_logits = hf(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
    assert logits.shape == (4, 2) and logits.std() > 1e-2
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=0)


def test_round_trip_is_identity():
    ours, hf = build_pair()
    state = ours.state_dict()
    back = from_hf_retrieval(to_hf_retrieval(state))
    not_carried = {k for k in state if NOT_IN_HF.match(k)}
    assert not_carried == {"temp", *(k for k in state if k.startswith("qformer.lm_head."))}
    assert set(back) == set(state) - not_carried
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    again = to_hf_retrieval(from_hf_retrieval(hf_state))
    assert set(again) == set(hf_state)
    assert all(torch.equal(again[k], hf_state[k]) for k in hf_state)


def test_hf_weights_load_into_ours(images):
    """HF -> ours: a model loaded from an HF state dict scores like the HF model."""
    _, hf = build_pair()
    ours = tiny_model(seed=5).eval()
    missing, unexpected = ours.load_state_dict(from_hf_retrieval(hf.state_dict()), strict=False)
    assert not unexpected and {k for k in missing if not NOT_IN_HF.match(k)} == set()
    ids, mask = text_batch(4, 7, 100, LENGTHS[:4])
    with torch.no_grad():
        logits = ours.itm_logits(ours.encode_image(images), ids, mask)
        hf_logits = hf(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, lengths", [
    (["vision.layer_norm_eps=1e-6", "ln_vision_eps=1e-6", "qformer.layer_norm_eps=1e-6"], LENGTHS),  # LAVIS's ViT eps
    (["qformer.cross_attention_freq=1"], LENGTHS),
    (["qformer.cross_attention_freq=3"], LENGTHS),
    (["qformer.num_query_tokens=7"], LENGTHS),  # an odd number of queries
    ([], [1, 1, 1, 1, 1]),  # one-token texts
], ids=["eps-1e-6", "cross-every-layer", "cross-every-3rd", "7-queries", "one-token"])
def test_scores_match_hf_beyond_the_default_config(images, overrides, lengths):
    ours = tiny_model(*overrides).eval()
    redraw_(ours)
    hf = Blip2ForImageTextRetrieval(hf_retrieval_config(tiny_config(*overrides))).eval()
    hf.load_state_dict(to_hf_retrieval(ours.state_dict()), strict=False)
    ids, mask = text_batch(len(lengths), 7, 100, lengths)
    with torch.no_grad():
        _, image_feats, _ = ours.image_features(ours.encode_image(images))
        _, text_feats = ours.text_features(ids, mask)
        sim = ours.itc_similarity(image_feats, text_feats)
        hf_sim = torch.stack([hf(pixel_values=img[None].expand(len(ids), -1, -1, -1), input_ids=ids, attention_mask=mask).logits_per_image[0] for img in images])
        itm = ours.itm_logits(ours.encode_image(images), ids[:4], mask[:4])
        hf_itm = hf(pixel_values=images, input_ids=ids[:4], attention_mask=mask[:4], use_image_text_matching_head=True).logits_per_image
    assert sim.std() > 1e-3 and itm.std() > 1e-3
    torch.testing.assert_close(sim, hf_sim, atol=1e-5, rtol=0)
    torch.testing.assert_close(itm, hf_itm, atol=1e-5, rtol=0)
