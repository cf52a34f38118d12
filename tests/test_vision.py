"""Frozen vision encoders: the small ViT (HF Blip2VisionModel parity), timm models and open_clip towers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lavis_lite.config import VisionConfig
from lavis_lite.models.vision import CLIP_MEAN, FrozenVisionEncoder, build_vision_encoder, vision_width
from lavis_lite.precision import resolve_dtype

# fp32 where the tests compare against a reference (`auto` would be bf16 on CPUs that run it natively)
TINY_VIT = dict(kind="vit", width=64, depth=2, heads=4, mlp_dim=128, patch_size=8, image_size=32, precision="fp32")


def _redraw(module: nn.Module, seed: int = 0) -> None:
    """Re-draw every floating parameter (HF's default vision init is degenerate)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _vit(**overrides) -> FrozenVisionEncoder:
    torch.manual_seed(0)
    return build_vision_encoder(VisionConfig(**{**TINY_VIT, **overrides}))


# --- kind "vit" ---


def test_vit_shapes_and_interface() -> None:
    encoder = _vit()
    tokens = encoder(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, encoder.num_tokens(32), 64) == (2, 17, 64)
    assert tokens.dtype == torch.float32
    assert encoder.width == 64 == vision_width(VisionConfig(**TINY_VIT))
    assert encoder.mean == CLIP_MEAN and len(encoder.std) == 3
    assert all(key.startswith("trunk.") for key in encoder.state_dict())


def test_vit_matches_hf_blip2_vision_model() -> None:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    cfg = VisionConfig(**TINY_VIT, layer_norm_eps=1e-5)
    hf = Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            layer_norm_eps=cfg.layer_norm_eps,
            qkv_bias=True,
        )
    ).eval()
    _redraw(hf)
    encoder = build_vision_encoder(cfg)
    # strict: the state dict maps 1:1 onto HF's, minus post_layernorm
    encoder.trunk.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith("post_layernorm.")})

    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    tokens = encoder(images)
    with torch.no_grad():
        hf_tokens = hf.encoder(inputs_embeds=hf.embeddings(images)).last_hidden_state
        hf_last = hf(pixel_values=images).last_hidden_state
    torch.testing.assert_close(tokens, hf_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf.post_layernorm(tokens), hf_last, atol=1e-5, rtol=1e-5)


def test_vit_is_frozen() -> None:
    encoder = _vit()
    parent = nn.ModuleDict({"vision": encoder, "head": nn.Linear(64, 1)})
    parent.train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert parent["head"].training and not any(m.training for m in encoder.modules())

    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    tokens = encoder(images)
    assert not tokens.requires_grad
    torch.testing.assert_close(encoder(images), tokens, atol=0, rtol=0)
    parent["head"](tokens).sum().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert images.grad is None and parent["head"].weight.grad is not None


def test_vit_precision() -> None:
    images = torch.randn(1, 3, 32, 32)
    auto = _vit(precision="auto")
    auto(images)
    assert next(auto.trunk.parameters()).dtype == resolve_dtype("auto", "cpu")  # resolved on the first forward
    fp32 = _vit(precision="fp32")
    reference = fp32(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a parent's autocast does not change the trunk's precision
        torch.testing.assert_close(fp32(images), reference, atol=0, rtol=0)

    bf16 = _vit(precision="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    tokens = bf16(images)
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, reference, atol=0.1, rtol=0.05)


def test_bad_kind_and_precision() -> None:
    with pytest.raises(ValueError, match="unknown vision.kind 'vitt'"):
        build_vision_encoder(VisionConfig(kind="vitt"))
    with pytest.raises(ValueError, match="vision.precision"):
        build_vision_encoder(VisionConfig(**{**TINY_VIT, "precision": "fp8"}))


# --- kind "timm" ---

TIMM_CNN = dict(kind="timm", name="tf_efficientnet_lite0", image_size=64, precision="fp32")


def test_timm_cnn_tokens() -> None:
    encoder = build_vision_encoder(VisionConfig(**TIMM_CNN))
    tokens = encoder(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, (64 // 32) ** 2, 1280) and tokens.dtype == torch.float32
    assert encoder.width == 1280 and encoder.num_tokens(64) == 4
    assert encoder.mean == (0.5, 0.5, 0.5)  # from timm's pretrained_cfg
    assert not any(p.requires_grad for p in encoder.parameters())


def test_timm_cnn_extra_levels_shapes_and_values() -> None:
    """Each token carries its final-grid cell of the earlier levels: the level's map pooled to the grid."""
    import timm

    torch.manual_seed(0)
    for pool, reduce in (("avg", torch.nn.functional.adaptive_avg_pool2d), ("max", torch.nn.functional.adaptive_max_pool2d)):
        encoder = build_vision_encoder(VisionConfig(**TIMM_CNN, extra_levels=[1, 3], extra_levels_pool=pool))
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
        reference.load_state_dict(encoder.trunk.state_dict())
        images = torch.randn(2, 3, 64, 64)
        tokens = encoder(images)
        assert encoder.width == 1280 + 24 + 112 and tokens.shape == (2, 4, 1280 + 24 + 112)
        assert encoder.num_tokens(64) == 4
        with torch.no_grad():
            final, (level1, level3) = reference.forward_intermediates(images, indices=[1, 3])
        expected = torch.cat([final, reduce(level1, (2, 2)), reduce(level3, (2, 2))], dim=1).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tokens[..., :1280], reference.forward_features(images).flatten(2).transpose(1, 2),
                                   atol=1e-4, rtol=1e-4)  # the final tokens are unchanged, the levels appended


def test_timm_cnn_extra_levels_frozen_traced_and_cacheable(tmp_path: Path) -> None:
    from lavis_lite.data.feature_cache import build_feature_cache, cache_fingerprint, trace_encoder

    cfg = VisionConfig(**TIMM_CNN, extra_levels=[2, 3], extra_levels_pool="max")
    encoder = build_vision_encoder(cfg)
    parent = nn.ModuleDict({"vision": encoder, "head": nn.Linear(encoder.width, 1)}).train()
    assert not any(p.requires_grad for p in encoder.parameters()) and not any(m.training for m in encoder.modules())
    images = torch.randn(3, 3, 64, 64, requires_grad=True)
    tokens = encoder(images)
    assert not tokens.requires_grad and encoder.traceable
    parent["head"](tokens).sum().backward()
    assert all(p.grad is None for p in encoder.parameters()) and images.grad is None

    traced = trace_encoder(encoder, torch.randn(2, 3, 64, 64))
    batch = torch.randn(5, 3, 64, 64)  # another batch size than the trace's
    torch.testing.assert_close(traced(batch), encoder(batch), atol=1e-4, rtol=1e-4)

    base = VisionConfig(**TIMM_CNN)
    assert cache_fingerprint(cfg, 64, []) != cache_fingerprint(base, 64, [])
    assert cache_fingerprint(cfg, 64, []) != cache_fingerprint(VisionConfig(**TIMM_CNN, extra_levels=[2, 3]), 64, [])
    batches = [{"image": batch, "key": [f"k{i}" for i in range(5)], "caption": [f"c{i}" for i in range(5)]}]
    cache = build_feature_cache(traced, batches, tmp_path / "cache", cache_fingerprint(cfg, 64, []))
    # the cache stores float16: equal to the encoder's tokens within half precision
    torch.testing.assert_close(cache.tokens(range(5)), encoder(batch), atol=2e-2, rtol=1e-2)


def test_timm_extra_levels_errors() -> None:
    with pytest.raises(ValueError, match=r"level 4 is not an earlier level.*0\.\.4"):
        build_vision_encoder(VisionConfig(**TIMM_CNN, extra_levels=[4]))
    with pytest.raises(ValueError, match="extra_levels_pool='mean'"):
        build_vision_encoder(VisionConfig(**TIMM_CNN, extra_levels=[2], extra_levels_pool="mean"))
    with pytest.raises(ValueError, match="needs a timm CNN"):
        build_vision_encoder(VisionConfig(kind="timm", name="vit_tiny_patch16_224", extra_levels=[2]))


def test_timm_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_vision_encoder(VisionConfig(**TIMM_CNN))
    state = {k: v.contiguous() for k, v in source.trunk.state_dict().items()}  # channels-last convs
    save_file(state, str(tmp_path / "cnn.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "cnn.pth")

    for name in ("cnn.safetensors", "cnn.pth"):
        torch.manual_seed(1)
        loaded = build_vision_encoder(VisionConfig(**TIMM_CNN, checkpoint=str(tmp_path / name)))
        for key, value in loaded.trunk.state_dict().items():
            torch.testing.assert_close(value, state[key], atol=0, rtol=0)

    bad = dict(state)
    bad["extra.weight"] = bad.pop("conv_stem.weight")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*conv_stem\.weight.*extra\.weight"):
        build_vision_encoder(VisionConfig(**TIMM_CNN, checkpoint=str(tmp_path / "bad.safetensors")))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_vision_encoder(VisionConfig(**TIMM_CNN, checkpoint=str(tmp_path / "missing.pt")))


def test_timm_vit_penultimate_block() -> None:
    import timm

    torch.manual_seed(0)
    encoder = build_vision_encoder(VisionConfig(kind="timm", name="vit_tiny_patch16_224", precision="fp32"))
    assert len(encoder.trunk.blocks) == 11 and encoder.width == 192

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    result = reference.load_state_dict(encoder.trunk.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("blocks.11.", "norm.")) for k in result.missing_keys)

    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x = reference.norm_pre(reference.patch_drop(reference._pos_embed(reference.patch_embed(images))))
        for block in reference.blocks[:-1]:
            x = block(x)
    tokens = encoder(images)
    assert tokens.shape == (2, encoder.num_tokens(224), 192) == (2, 197, 192)
    torch.testing.assert_close(tokens, x, atol=1e-5, rtol=1e-5)


# --- kind "open_clip" ---


def test_open_clip_eva_vit_g_on_meta_device() -> None:
    cfg = VisionConfig(kind="open_clip", name="EVA01-g-14", image_size=224)
    with torch.device("meta"):
        encoder = build_vision_encoder(cfg)
        tokens = encoder(torch.empty(1, 3, 224, 224))
    params = sum(p.numel() for p in encoder.parameters())
    # ViT-g/14 is ~1.01B parameters; without its last block (as in BLIP-2) ~0.986B
    assert 0.95e9 < params < 1.0e9, params
    assert all(p.is_meta for p in encoder.parameters())
    assert len(encoder.trunk.blocks) == 39 and encoder.width == 1408
    assert tokens.shape == (1, 257, 1408) and encoder.num_tokens(224) == 257
    assert encoder.mean == CLIP_MEAN
    assert vision_width(cfg) == 1408


@pytest.fixture(scope="module")
def tiny_open_clip_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Register two tiny open_clip configs: a timm EVA tower and a native VisionTransformer."""
    import open_clip

    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    configs = {
        "lavis-lite-test-eva-tiny": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                           "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
            "text_cfg": text,
            "custom_text": True,
        },
        "lavis-lite-test-vit-tiny": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
            "text_cfg": text,
        },
    }
    directory = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in configs.items():
        (directory / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory)
    return {"eva": "lavis-lite-test-eva-tiny", "vit": "lavis-lite-test-vit-tiny"}


def test_open_clip_timm_eva_penultimate_tokens(tiny_open_clip_configs: dict[str, str]) -> None:
    import open_clip

    name = tiny_open_clip_configs["eva"]
    encoder = build_vision_encoder(VisionConfig(kind="open_clip", name=name, image_size=224, precision="fp32"))
    assert len(encoder.trunk.blocks) == 11 and encoder.width == 192

    trunk = open_clip.create_model(name, pretrained_text=False).visual.trunk.eval()
    result = trunk.load_state_dict(encoder.trunk.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(("blocks.11.", "norm.", "head.")) for k in result.missing_keys)

    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x, rope = trunk._pos_embed(trunk.patch_embed(images))
        x = trunk.norm_pre(x)
        for block in trunk.blocks[:-1]:
            x = block(x, rope=rope)
    tokens = encoder(images)
    assert tokens.shape == (2, encoder.num_tokens(224), 192) == (2, (224 // 14) ** 2 + 1, 192)
    torch.testing.assert_close(tokens, x, atol=1e-5, rtol=1e-5)


def test_open_clip_native_vit_penultimate_tokens(tiny_open_clip_configs: dict[str, str], tmp_path: Path) -> None:
    import open_clip

    name = tiny_open_clip_configs["vit"]
    reference = open_clip.create_model(name, pretrained_text=False).eval()
    _redraw(reference, seed=1)
    torch.save(reference.state_dict(), tmp_path / "clip.pt")

    encoder = build_vision_encoder(
        VisionConfig(
            kind="open_clip", name=name, image_size=32, checkpoint=str(tmp_path / "clip.pt"), precision="fp32"
        )
    )
    assert len(encoder.trunk.transformer.resblocks) == 2 and encoder.width == 64
    assert encoder.trunk.proj is None  # pruned head

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = reference.visual.forward_intermediates(
            images, indices=[1], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
    expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    tokens = encoder(images)
    assert tokens.shape == (2, encoder.num_tokens(32), 64) == (2, 17, 64)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(FileNotFoundError, match="no-such-file"):
        build_vision_encoder(VisionConfig(kind="open_clip", name=name, checkpoint="no-such-file"))
