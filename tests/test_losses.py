"""Stage-1 losses: finite, they go down when a tiny model overfits 8 pairs, and gradients reach the right places."""

import pytest
import torch

from lavis_lite.models.losses import IGNORE, itc_loss, itg_loss, itm_loss, lm_loss, sample_negatives
from conftest import text_batch, tiny_model

B = 8


@pytest.fixture(scope="module")
def batch():
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids, mask = text_batch(B, 10, 100, [10, 8, 6, 9, 10, 5, 7, 10], seed=1)
    return images, ids, mask


def test_losses_finite_and_summed(batch):
    images, ids, mask = batch
    out = tiny_model()(ids, mask, images=images, generator=torch.Generator().manual_seed(0))
    parts = [out.loss_itc, out.loss_itm, out.loss_itg]
    assert all(p is not None and torch.isfinite(p) for p in parts)
    torch.testing.assert_close(out.loss, sum(parts))


def test_gradients_reach_trainable_parts_only(batch):
    images, ids, mask = batch
    model = tiny_model().train()
    model(ids, mask, images=images, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("vision."):
            assert not p.requires_grad and p.grad is None, name
        elif name == "qformer.embeddings.word.weight":
            assert p.grad[ids.unique()].abs().sum() > 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert model.vision.training is False, "the frozen encoder stays in eval mode"


def test_single_loss_selection(batch):
    images, ids, mask = batch
    out = tiny_model("losses=[itg]")(ids, mask, images=images)
    assert out.loss_itc is None and out.loss_itm is None
    torch.testing.assert_close(out.loss, out.loss_itg)
    with pytest.raises(ValueError, match="unknown loss"):
        tiny_model("losses=[itc,mlm]")


def test_itm_and_itg_batch_fractions_set_their_own_shares(batch):
    """ITM's and ITG's losses are those of the batch's first pairs alone, each share set on its own."""
    images, ids, mask = batch
    model = tiny_model("itm_batch_fraction=0.25", "itg_batch_fraction=0.5")
    seen = {}
    for name in ("_itm_loss", "_itg_loss"):
        original = getattr(model, name)

        def spy(*args, _name=name, _original=original):
            seen[_name] = args
            return _original(*args)

        setattr(model, name, spy)
    with torch.no_grad():
        out = model(ids, mask, images=images, generator=torch.Generator().manual_seed(0))
        first = tiny_model("itm_batch_fraction=1.0", "itg_batch_fraction=1.0", "losses=[itg]")
        full_itg = first(ids[: B // 2], mask[: B // 2], images=images[: B // 2]).loss_itg
    assert seen["_itm_loss"][-1] == B // 4, "ITM on a quarter of the pairs"
    assert seen["_itg_loss"][0].shape[0] == B // 2, "ITG on half"
    torch.testing.assert_close(out.loss_itg, full_itg)  # ITG of the first half = the first half's whole-batch ITG


def test_overfitting_a_batch_lowers_every_loss(batch):
    images, ids, mask = batch
    model = tiny_model().train()
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(220):
        out = model(ids, mask, images=images, generator=gen)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append([out.loss_itc.item(), out.loss_itm.item(), out.loss_itg.item()])
    # ITM's negatives are re-drawn every step, so its loss is noisy: average the last 40 steps.
    first, last = torch.tensor(history[:3]).mean(0), torch.tensor(history[-40:]).mean(0)
    for name, a, b in zip(["itc", "itm", "itg"], first, last):
        assert b < 0.7 * a, f"{name} did not fall: {a:.3f} -> {b:.3f}"
    # ITM must beat the constant guess of its 1:2 label prior (cross-entropy 0.637), not just reach it.
    assert last[1] < 0.5, f"ITM stuck near its label prior: {last[1]:.3f}"
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vision_before.items())


def test_shared_sample_ids_are_positives(batch):
    """Pairs with the same id are ITC positives and never drawn as ITM negatives."""
    images, ids, mask = batch
    model = tiny_model().eval()
    same = torch.zeros(B, dtype=torch.long)
    out = model(ids, mask, images=images, sample_ids=same, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    positives = torch.eye(4, dtype=torch.bool) | torch.tensor([[0, 1, 0, 0]] * 4, dtype=torch.bool)
    picks = sample_negatives(torch.zeros(4, 4), positives, torch.Generator().manual_seed(0))
    assert not positives[torch.arange(4), picks].any()


def test_caption_positives_off_counts_each_pair_alone(batch):
    """`caption_positives=false` (LAVIS's pre-training): shared sample ids change nothing."""
    images, ids, mask = batch
    shared = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5])

    def loss(sample_ids, *overrides):
        model = tiny_model(*overrides).eval()
        return model(ids, mask, images=images, sample_ids=sample_ids, generator=torch.Generator().manual_seed(0)).loss

    assert loss(shared, "caption_positives=false") == loss(None)
    assert loss(shared) != loss(None)


def test_itc_gather_without_grad_is_lavis_concat_all_gather(batch):
    """`itc_gather_with_grad=false`: the same ITC value; each direction's gradient reaches only its own side."""
    import torch.nn.functional as F

    images, ids, mask = batch

    def itc_grads(*overrides, by_hand=False):
        model = tiny_model("losses=[itc]", *overrides).eval()
        if by_hand:
            _, image_feats, _ = model.image_features(model.encode_image(images))
            _, text_feat = model.text_features(ids, mask)
            sim_i2t = model.itc_similarity(image_feats, text_feat.detach())
            sim_t2i = model.itc_similarity(image_feats.detach(), text_feat).t()
            targets = torch.eye(B)
            loss = (F.cross_entropy(sim_i2t / model.temp, targets, label_smoothing=0.1)
                    + F.cross_entropy(sim_t2i / model.temp, targets, label_smoothing=0.1)) / 2
        else:
            loss = model(ids, mask, images=images).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ours, ours_grads = itc_grads()
    lavis, lavis_grads = itc_grads("itc_gather_with_grad=false")
    by_hand, by_hand_grads = itc_grads(by_hand=True)
    torch.testing.assert_close(lavis, ours)
    torch.testing.assert_close(lavis, by_hand)
    assert lavis_grads.keys() == by_hand_grads.keys()
    for name in lavis_grads:
        torch.testing.assert_close(lavis_grads[name], by_hand_grads[name], msg=name)
    assert any(not torch.allclose(lavis_grads[n], ours_grads[n]) for n in lavis_grads)


# --- the loss functions on their own --------------------------------------------------------------------


def test_itc_loss_is_the_mean_of_both_directions_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    sim_i2t, sim_t2i = torch.rand(4, 6, generator=gen), torch.rand(4, 6, generator=gen)
    positives = torch.zeros(4, 6, dtype=torch.bool)
    positives[torch.arange(4), torch.arange(4) + 2] = True  # this rank's rows sit at columns 2..5
    temp = torch.tensor(0.07)
    by_hand = sum(
        -(s / temp).log_softmax(dim=1)[torch.arange(4), torch.arange(4) + 2].mean() for s in (sim_i2t, sim_t2i)
    ) / 2
    torch.testing.assert_close(itc_loss(sim_i2t, sim_t2i, positives, temp), by_hand)


def test_itc_loss_spreads_the_target_over_shared_positives():
    """Two positives in a row: the target is half on each, so equal scores on both are the optimum."""
    sim = torch.tensor([[5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    positives = torch.tensor([[True, True, False], [False, False, True]])
    best = itc_loss(sim, sim, positives, torch.tensor(1.0))
    skewed = itc_loss(sim + torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]), sim, positives, torch.tensor(1.0))
    assert best < skewed
    torch.testing.assert_close(best, torch.tensor(0.5 * 0.6931), atol=2e-3, rtol=0)  # row 0: ln 2, row 1: ~0


def test_sample_negatives_follows_the_softmax_of_non_positives():
    logits = torch.tensor([[0.0, 0.0, 2.0, -1e4]] * 4000)
    positives = torch.zeros_like(logits, dtype=torch.bool)
    positives[:, 0] = True
    picks = sample_negatives(logits, positives, torch.Generator().manual_seed(0))
    share = torch.bincount(picks, minlength=4).float() / len(picks)
    expected = torch.tensor([0.0, 1.0, torch.e**2, 0.0]) / (1 + torch.e**2)
    torch.testing.assert_close(share, expected, atol=0.02, rtol=0)


def test_sample_negatives_of_an_all_positive_row_draws_uniformly():
    positives = torch.ones(2000, 3, dtype=torch.bool)
    picks = sample_negatives(torch.randn(2000, 3), positives, torch.Generator().manual_seed(0))
    share = torch.bincount(picks, minlength=3).float() / len(picks)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3), atol=0.04, rtol=0)


def test_itm_loss_labels_the_first_third_as_matches():
    sure = torch.tensor([[-9.0, 9.0]] * 2 + [[9.0, -9.0]] * 4)
    assert itm_loss(sure) < 1e-6
    assert itm_loss(sure.flip(1)) > 17


def test_itg_and_lm_loss_are_next_token_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(5, 11, generator=gen), torch.tensor([1, 2, 3, 4, 5])
    by_hand = -logits.log_softmax(dim=1)[torch.arange(5), targets].mean()
    torch.testing.assert_close(itg_loss(logits, targets), by_hand)
    labels = torch.tensor([[IGNORE, 1, 2], [3, IGNORE, IGNORE]])
    batch = torch.randn(2, 3, 11, generator=gen, dtype=torch.bfloat16)
    kept = batch.float()[labels != IGNORE]
    by_hand = -kept.log_softmax(dim=1)[torch.arange(3), labels[labels != IGNORE]].mean()
    torch.testing.assert_close(lm_loss(batch, labels), by_hand)
