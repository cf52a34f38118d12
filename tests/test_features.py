"""The feature-extraction API: LAVIS's fields per mode, values equal to the model's own scoring, checkpoint
loading (round trip, stable id, clear errors) and the processors."""

import copy

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lavis_lite import Blip2FeatureExtractor, ConfigError, create_model, load_model_and_preprocess
from lavis_lite.checkpoint import save_checkpoint
from lavis_lite.config import LanguageModelConfig, Stage2ModelConfig
from lavis_lite.precision import resolve_dtype
from stage1.config import Stage1Config
from stage2.config import Stage2Config
from conftest import redraw_, save_bert_tokenizer, tiny_config

WORDS = ["a", "red", "blue", "green", "circle", "square", "small", "big", "on", "the", "left", "right", "of"]
TEXTS = ["a red circle on the left", "the big blue square", "a small green circle", "red"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    return save_bert_tokenizer(path, WORDS)


@pytest.fixture(scope="module")
def trained(tokenizer_dir, tmp_path_factory):
    """A stage-1 model with non-trivial weights, saved as a run directory whose frozen ViT has a weights file."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(f"qformer.tokenizer={tokenizer_dir}", f"qformer.vocab_size={len(WORDS) + 6}", "qformer.attn_impl=sdpa")
    torch.manual_seed(0)
    model, tokenizer = create_model(cfg)
    redraw_(model)
    save_file(model.vision.trunk.state_dict(), str(root / "vit.safetensors"))
    cfg.vision.checkpoint = str(root / "vit.safetensors")
    save_checkpoint(root / "run", 1, model, {}, Stage1Config(model=cfg))
    return Blip2FeatureExtractor(model.eval(), tokenizer, "memory"), root / "run"


def test_modes_fill_their_fields(trained, images):
    extractor, _ = trained
    q, d, e = extractor.num_queries, 32, extractor.embed_dim
    image = extractor.extract_features({"image": images}, mode="image")
    assert image.image_embeds.shape == (4, q, d) and image.image_embeds_proj.shape == (4, q, e)
    assert image.text_embeds is image.text_embeds_proj is image.multimodal_embeds is None
    text = extractor.extract_features({"text_input": TEXTS}, mode="text")
    length = extractor.tokenize(TEXTS).input_ids.shape[1]
    assert text.text_embeds.shape == (4, length, d) and text.text_embeds_proj.shape == (4, length, e)
    assert text.image_embeds is text.image_embeds_proj is text.multimodal_embeds is None
    joint = extractor.extract_features({"image": images, "text_input": TEXTS})
    assert joint.multimodal_embeds.shape == (4, q, d)
    assert joint.image_embeds is joint.image_embeds_proj is joint.text_embeds is joint.text_embeds_proj is None
    for tensor in (image.image_embeds, image.image_embeds_proj, text.text_embeds, joint.multimodal_embeds):
        assert tensor.dtype == torch.float32 and not tensor.requires_grad
    ones = torch.ones(())
    torch.testing.assert_close(image.image_embeds_proj.norm(dim=-1), ones.expand(4, q), atol=1e-5, rtol=0)
    torch.testing.assert_close(text.text_embeds_proj.norm(dim=-1), ones.expand(4, length), atol=1e-5, rtol=0)


def test_values_equal_the_models_own_scoring(trained, images):
    extractor, _ = trained
    model = extractor.model
    tokens = extractor.tokenize(TEXTS)
    with torch.no_grad():
        embeds = model.encode_image(images)
        query_out, image_feats, _ = model.image_features(embeds)
        text_out, text_feat = model.text_features(tokens.input_ids, tokens.attention_mask)
        joint = model.multimodal_features(embeds, tokens.input_ids, tokens.attention_mask)
        itm = model.itm_logits(embeds, tokens.input_ids, tokens.attention_mask)[:, 1]
    image = extractor.extract_features({"image": images}, mode="image")
    text = extractor.extract_features({"text_input": TEXTS}, mode="text")
    multimodal = extractor.extract_features({"image": images, "text_input": TEXTS}, mode="multimodal")
    assert torch.equal(extractor.encode_images(images), embeds)
    assert torch.equal(image.image_embeds, query_out) and torch.equal(image.image_embeds_proj, image_feats)
    assert torch.equal(extractor.image_vectors(images), image_feats)
    assert torch.equal(extractor.image_vectors(image_embeds=embeds), image_feats)
    assert torch.equal(text.text_embeds, text_out) and torch.equal(extractor.text_vectors(TEXTS), text_feat)
    torch.testing.assert_close(text.text_embeds_proj[:, 0], text_feat, atol=1e-6, rtol=0)
    assert torch.equal(multimodal.multimodal_embeds, joint)
    sim = model.itc_similarity(image_feats, text_feat)
    assert sim.std() > 1e-2, "scores must vary for the comparison to mean anything"
    assert torch.equal(extractor.itc_scores(images, TEXTS), sim)
    assert torch.equal(extractor.itm_scores(images, TEXTS), itm) and itm.std() > 1e-2


def test_scores_agree_with_extracted_features(trained, images):
    extractor, _ = trained
    image = extractor.extract_features({"image": images}, mode="image")
    text = extractor.extract_features({"text_input": TEXTS}, mode="text")
    expected = (image.image_embeds_proj @ text.text_embeds_proj[:, 0].t()).amax(dim=1)
    torch.testing.assert_close(extractor.itc_scores(images, TEXTS), expected, atol=1e-5, rtol=0)
    joint = extractor.extract_features({"image": images, "text_input": TEXTS}, mode="multimodal")
    itm = extractor.model.itm_head(joint.multimodal_embeds).mean(dim=1)[:, 1]
    torch.testing.assert_close(extractor.itm_scores(images, TEXTS), itm, atol=1e-5, rtol=0)


def test_itm_reranks_many_texts_against_one_image(trained, images):
    extractor, _ = trained
    one = images[:1]
    embeds = extractor.encode_images(one)
    pairwise = extractor.itm_scores(one.expand(len(TEXTS), -1, -1, -1), TEXTS)
    torch.testing.assert_close(extractor.itm_scores(texts=TEXTS, image_embeds=embeds), pairwise, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 images for 4 texts"):
        extractor.itm_scores(images[:2], TEXTS)
    with pytest.raises(ValueError, match="exactly one of images"):
        extractor.itm_scores(images, TEXTS, image_embeds=embeds)


def test_checkpoint_round_trip(trained, images, tmp_path):
    extractor, run_dir = trained
    loaded, vis_processors, txt_processors = load_model_and_preprocess(run_dir, dtype=torch.float32)
    again, _, _ = load_model_and_preprocess(run_dir / "checkpoints" / "step-00000001", dtype=torch.float32)
    assert loaded.source == str(run_dir) and not loaded.training and loaded.dtype == torch.float32
    assert (loaded.embed_dim, loaded.num_queries, loaded.image_size) == (16, 8, 32)
    assert len(loaded.checkpoint_id) == 16 and loaded.checkpoint_id == again.checkpoint_id == extractor.checkpoint_id
    for mode in ("image", "text", "multimodal"):
        ours = extractor.extract_features({"image": images, "text_input": TEXTS}, mode=mode)
        theirs = loaded.extract_features({"image": images, "text_input": TEXTS}, mode=mode)
        for name, value in vars(ours).items():
            assert (value is None and getattr(theirs, name) is None) or torch.equal(value, getattr(theirs, name)), name
    pixels = vis_processors["eval"](Image.new("RGB", (50, 40), (200, 30, 30)))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert txt_processors["eval"]("  A red\tcircle.  On the LEFT! ") == "A red circle On the LEFT"
    # Different weights, a different id.
    changed_model = copy.deepcopy(extractor.model)
    with torch.no_grad():
        changed_model.itm_head.bias[0] += 1.0
    save_checkpoint(tmp_path / "changed", 1, changed_model, {}, Stage1Config(model=changed_model.cfg))
    changed, _, _ = load_model_and_preprocess(tmp_path / "changed", dtype=torch.float32)
    assert changed.checkpoint_id != loaded.checkpoint_id


def test_bf16_computes_in_bf16_and_returns_float32(trained, images):
    extractor, run_dir = trained
    half, _, _ = load_model_and_preprocess(run_dir, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.checkpoint_id == extractor.checkpoint_id
    vectors = half.image_vectors(images)
    assert vectors.dtype == torch.float32
    torch.testing.assert_close(vectors, extractor.image_vectors(images), atol=0.05, rtol=0)
    assert half.itm_scores(images, TEXTS).dtype == torch.float32


def test_not_a_stage1_checkpoint_is_named(tmp_path, trained):
    extractor, _ = trained
    stage2 = Stage2Config(model=Stage2ModelConfig(llm=LanguageModelConfig(path="llm")))
    save_checkpoint(tmp_path / "stage2", 1, extractor.model, {}, stage2)
    with pytest.raises(ConfigError, match="is not a stage-1 checkpoint .*stage-2"):
        load_model_and_preprocess(tmp_path / "stage2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_model_and_preprocess(tmp_path / "empty")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    save_file({"x": torch.zeros(1)}, str(weights_only / "model.safetensors"))
    with pytest.raises(ConfigError, match="has no config.yaml"):
        load_model_and_preprocess(weights_only)


def test_bad_inputs_are_named(trained, images):
    extractor, _ = trained
    with pytest.raises(ValueError, match=r"mode 'text' needs samples\['text_input'\]"):
        extractor.extract_features({"image": images}, mode="text")
    with pytest.raises(ValueError, match=r"mode 'multimodal' needs samples\['image'\]"):
        extractor.extract_features({"text_input": TEXTS}, mode="multimodal")
    with pytest.raises(ValueError, match=r"mode 'image' needs samples\['image'\]"):
        extractor.extract_features({}, mode="image")
    with pytest.raises(ValueError, match="unknown mode 'both'"):
        extractor.extract_features({"image": images}, mode="both")
    with pytest.raises(ValueError, match=r"empty text at position\(s\) \[1\]"):
        extractor.text_vectors(["a red circle", "  "])


def test_config_name_builds_an_untrained_model(tokenizer_dir):
    model, vis_processors, _ = load_model_and_preprocess("tiny", overrides=["qformer.num_layers=2"])
    assert model.source == "tiny" and len(model.model.qformer.layers) == 2
    pixels = vis_processors["eval"](Image.new("RGB", (20, 20)))[None]
    assert model.image_vectors(pixels).shape == (1, 8, 16)
    with pytest.raises(ValueError, match="has no tokenizer"):
        model.text_vectors(["a red circle"])
    with_text, _, _ = load_model_and_preprocess(
        "tiny", overrides=[f"qformer.tokenizer={tokenizer_dir}", f"qformer.vocab_size={len(WORDS) + 6}"]
    )
    assert with_text.text_vectors(TEXTS).shape == (4, 16)
    assert with_text.checkpoint_id != model.checkpoint_id


def test_cnn_encoder_is_traced_on_cpu_within_tolerance(images):
    """A traceable (CNN) encoder runs traced and frozen, as the feature cache does: features stay within 1e-5."""
    extractor, _, _ = load_model_and_preprocess(
        "tiny", dtype=torch.float32, overrides=["vision.kind=timm", "vision.name=tf_efficientnet_lite0"]
    )
    model = extractor.model
    assert model.vision.traceable
    with torch.no_grad():
        expected = model.image_features(model.encode_image(images))[1]
    torch.testing.assert_close(extractor.image_vectors(images), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(extractor.image_vectors(images[:1]), expected[:1], atol=1e-5, rtol=0)


def test_default_dtype_is_the_one_auto(trained):
    """No dtype: `auto` as everywhere else (bf16 where the CPU or GPU runs it natively, else fp32 on CPU)."""
    _, run_dir = trained
    default, _, _ = load_model_and_preprocess(run_dir)
    assert default.dtype == resolve_dtype("auto", "cpu")
