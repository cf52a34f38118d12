"""Who sees whom under each self-attention mask, shown by perturbing inputs and watching outputs."""

import pytest
import torch

from lavis_lite import build_attention_mask
from conftest import text_batch, tiny_model

Q, T = 8, 6
LENGTHS = [6, 4]  # the second text has two padding tokens


@pytest.fixture(scope="module")
def setup():
    model = tiny_model().eval()
    ids, mask = text_batch(2, T, 100, LENGTHS)
    image = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    return model, ids, mask, image


def joint(model, kind, ids, mask, image, queries=None):
    queries = model.query_tokens.expand(2, -1, -1) if queries is None else queries
    allowed = build_attention_mask(kind, Q, mask)
    with torch.no_grad():
        out, _ = model.qformer(query_embeds=queries, input_ids=ids, allowed=allowed, image_embeds=image)
    return out


def changed(a, b):
    """[B, L] booleans: which output rows changed."""
    return (a - b).abs().amax(dim=-1) > 1e-6


def perturb_text(ids, position):
    ids = ids.clone()
    ids[:, position] = (ids[:, position] + 7) % 90 + 5
    return ids


def test_mask_tensor_shape_and_padding():
    _, mask = text_batch(2, T, 100, LENGTHS)
    for kind in ("itc", "itm", "itg"):
        allowed = build_attention_mask(kind, Q, mask)
        assert allowed.shape == (2, 1, Q + T, Q + T) and allowed.dtype == torch.bool
        assert not allowed[1, 0, :, Q + 4 :].any(), "padded keys are never attended"
    with pytest.raises(ValueError, match="unknown mask kind"):
        build_attention_mask("causal", Q, mask)


def test_itc_unimodal(setup):
    model, ids, mask, image = setup
    base = joint(model, "itc", ids, mask, image)
    text_moved = changed(base, joint(model, "itc", perturb_text(ids, 2), mask, image))
    assert not text_moved[:, :Q].any(), "queries must not see text"
    assert text_moved[0, Q:].all(), "every text token sees text token 2"
    image_moved = changed(base, joint(model, "itc", ids, mask, image + 1.0))
    assert image_moved[:, :Q].all() and not image_moved[:, Q:].any(), "text must not see queries (nor the image)"


def test_itm_bidirectional(setup):
    model, ids, mask, image = setup
    base = joint(model, "itm", ids, mask, image)
    text_moved = changed(base, joint(model, "itm", perturb_text(ids, 2), mask, image))
    assert text_moved.all(), "queries and text all see text token 2"
    image_moved = changed(base, joint(model, "itm", ids, mask, image + 1.0))
    assert image_moved.all(), "text sees the queries, which see the image"


def test_itg_multimodal_causal(setup):
    model, ids, mask, image = setup
    base = joint(model, "itg", ids, mask, image)
    for position in range(1, 4):
        moved = changed(base, joint(model, "itg", perturb_text(ids, position), mask, image))
        assert not moved[:, :Q].any(), "queries must not see text"
        assert not moved[:, Q : Q + position].any(), f"tokens before {position} must not see it"
        assert moved[0, Q + position :].all(), f"tokens from {position} on see it"
    image_moved = changed(base, joint(model, "itg", ids, mask, image + 1.0))
    assert image_moved.all(), "every text token sees all queries"


@pytest.mark.parametrize("kind", ["itc", "itm", "itg"])
def test_padding_is_invisible(setup, kind):
    model, ids, mask, image = setup
    base = joint(model, kind, ids, mask, image)
    moved = changed(base, joint(model, kind, perturb_text(ids, 5), mask, image))
    assert not moved[1, : Q + LENGTHS[1]].any(), "a padded token changes no real row"


def test_model_passes_equal_joint_passes(setup):
    """The model's separate ITC passes and its ITG pass on cached query keys/values equal one joint pass."""
    model, ids, mask, image = setup
    with torch.no_grad():
        query_out, _, query_kv = model.image_features(image)
        text_out, _ = model.text_features(ids, mask)
        itc = joint(model, "itc", ids, mask, image)
        torch.testing.assert_close(query_out, itc[:, :Q], atol=1e-5, rtol=0)
        torch.testing.assert_close(text_out, itc[:, Q:], atol=1e-5, rtol=0)
        allowed = build_attention_mask("itg", Q, mask)[:, :, Q:]
        itg_text, _ = model.qformer(input_ids=ids, allowed=allowed, prefix=query_kv)
        torch.testing.assert_close(itg_text, joint(model, "itg", ids, mask, image)[:, Q:], atol=1e-5, rtol=0)
