"""LAVIS checkpoints load exactly: a LAVIS-layout file made from a random transformers BLIP-2 model (by the
inverse of transformers' own conversion script) gives HF's scores and logits in our model; ours -> LAVIS ->
ours is the identity; a key that does not fit is an error naming it; the real-size LAVIS key set maps onto
our LAVIS-architecture config with every shape equal."""

import re

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from conftest import redraw_, text_batch, tiny_config, tiny_model
from lavis_lite.config import ConfigError, load_model_config
from lavis_lite.interop.convert_hf import HF_TEXT_FFN, hf_conditional_generation_config, hf_retrieval_config
from lavis_lite.interop.convert_lavis import from_lavis, load_lavis_weights, to_lavis
from lavis_lite.models.factory import create_stage2_model
from lavis_lite.models.stage1_model import Blip2Stage1
from test_parity_stage2 import IMAGE_TOKEN, hf_scores, llm_dirs, redraw_all_  # noqa: F401  (llm_dirs: a fixture)
from test_parity_stage2 import text_batch as stage2_text_batch

# transformers' convert_blip_2_original_to_pytorch.py renames, read backwards (HF -> LAVIS): written out here
# apart from lavis_lite's own tables, so that the test checks them against the script, not against themselves.
HF_TO_LAVIS = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.", r"visual_encoder.blocks.\1.attn."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^embeddings\.", "Qformer.bert.embeddings."),
    (r"^qformer\.", "Qformer.bert."),
    (r"^vision_projection\.", "vision_proj."),
    (r"^text_projection\.", "text_proj."),
    (r"^language_projection\.", "opt_proj."),
    (r"^language_model\.", "opt_model."),
]


def no_key_bias_(model) -> None:
    """EVA's attention (LAVIS's ViT) has no key bias: zero that third of the fused qkv bias (ours or HF's)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                param.chunk(3)[1].zero_()


def lavis_state_from_hf(hf_state: dict, seed: int = 0) -> dict:
    """What LAVIS's `state_dict()` holds for the model transformers converted `hf_state` from."""
    out = {}
    for key, value in hf_state.items():
        if key.endswith("position_ids"):
            continue
        if re.match(r"^vision_model\.encoder\.layers\.\d+\.self_attn\.qkv\.bias$", key):  # EVA: q_bias, v_bias
            q, k, v = value.chunk(3)
            assert torch.all(k == 0), "EVA's attention has no key bias"
            block = f"visual_encoder.blocks.{key.split('.')[3]}.attn."
            out[block + "q_bias"], out[block + "v_bias"] = q, v
            continue
        for pattern, replacement in HF_TO_LAVIS:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key.replace("attention.attention.", "attention.self.")] = value  # the script: "self" -> "attention"
    if "Qformer.bert.embeddings.word_embeddings.weight" in out:  # stage 1: the ITG head HF does not keep
        gen = torch.Generator().manual_seed(seed)
        hidden, vocab = out["Qformer.bert.embeddings.word_embeddings.weight"].shape[::-1]
        head = "Qformer.cls.predictions."
        out[head + "transform.dense.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.1
        out[head + "transform.dense.bias"] = torch.randn(hidden, generator=gen) * 0.1
        out[head + "transform.LayerNorm.weight"] = 1 + torch.randn(hidden, generator=gen) * 0.1
        out[head + "transform.LayerNorm.bias"] = torch.randn(hidden, generator=gen) * 0.1
        out[head + "bias"] = torch.randn(vocab, generator=gen) * 0.1
        out[head + "decoder.weight"] = out["Qformer.bert.embeddings.word_embeddings.weight"]
        out[head + "decoder.bias"] = out[head + "bias"]
        out["temp"] = torch.tensor(0.05)
        out["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    return out


def save_lavis(path, state):
    torch.save({"model": state, "config": {"arch": "blip2"}}, path)  # LAVIS's checkpoint wrapper
    return path


@pytest.fixture
def hf_retrieval():
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval(hf_retrieval_config(tiny_config())).eval()
    redraw_(hf)
    no_key_bias_(hf)
    return hf


def test_a_lavis_stage1_checkpoint_gives_hf_scores(hf_retrieval, images, tmp_path):
    lavis = lavis_state_from_hf(hf_retrieval.state_dict())
    assert {"Qformer.bert.encoder.layer.0.attention.self.query.weight", "visual_encoder.blocks.1.attn.q_bias",
            "Qformer.bert.encoder.layer.0.crossattention.self.key.weight", "ln_vision.weight"} <= set(lavis)
    ours = tiny_model()
    load_lavis_weights(ours, save_lavis(tmp_path / "blip2_pretrained.pth", lavis))
    ours.eval()
    ids, mask = text_batch(5, 7, 100, [7, 3, 5, 1, 7])
    with torch.no_grad():
        _, image_feats, _ = ours.image_features(ours.encode_image(images))
        _, text_feats = ours.text_features(ids, mask)
        sim = ours.itc_similarity(image_feats, text_feats)
        hf_sim = torch.stack([hf_retrieval(pixel_values=img[None].expand(5, -1, -1, -1), input_ids=ids,
                                           attention_mask=mask).logits_per_image[0] for img in images])
        itm = ours.itm_logits(ours.encode_image(images), ids[:4], mask[:4])
        hf_itm = hf_retrieval(pixel_values=images, input_ids=ids[:4], attention_mask=mask[:4],
                              use_image_text_matching_head=True).logits_per_image
    assert sim.std() > 1e-3 and itm.std() > 1e-2
    torch.testing.assert_close(sim, hf_sim, atol=1e-5, rtol=0)
    torch.testing.assert_close(itm, hf_itm, atol=1e-5, rtol=0)
    assert torch.equal(ours.temp, torch.tensor(0.05))
    assert torch.equal(ours.qformer.lm_head.dense.weight, lavis["Qformer.cls.predictions.transform.dense.weight"])


def test_a_lavis_stage2_checkpoint_gives_hf_logits(llm_dirs, images, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    ours = create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs['opt']}"]).eval()
    hf = Blip2ForConditionalGeneration(hf_conditional_generation_config(ours.cfg, ours.llm.config, IMAGE_TOKEN)).eval()
    redraw_all_(hf, hf.language_model)
    no_key_bias_(hf)
    hf_state = {k: v for k, v in hf.state_dict().items() if not HF_TEXT_FFN.match(k)}  # LAVIS's stage 2 has none
    lavis = {k: v for k, v in lavis_state_from_hf(hf_state).items() if not k.startswith("opt_model.")}  # LLM shipped apart
    assert "opt_proj.weight" in lavis
    llm = {k[len("language_model."):]: v for k, v in hf_state.items() if k.startswith("language_model.")}
    ours.llm.load_state_dict(llm)  # the same frozen LLM as HF's, which LAVIS ships apart
    load_lavis_weights(ours, save_lavis(tmp_path / "blip2_pretrained_opt.pth", lavis), stage=2)
    batch = stage2_text_batch(ours)
    with torch.no_grad():
        out = ours(**batch, images=images)
        _, hf_logits = hf_scores(hf, ours, images, batch)
    assert out.logits.std() > 0.1
    torch.testing.assert_close(out.logits, hf_logits, atol=1e-4, rtol=0)


def test_ours_to_lavis_to_ours_is_the_identity(llm_dirs):  # noqa: F811
    model = tiny_model()
    redraw_(model)
    no_key_bias_(model)
    state = model.state_dict()
    lavis = to_lavis(state)
    assert lavis["Qformer.cls.predictions.decoder.weight"] is lavis["Qformer.bert.embeddings.word_embeddings.weight"]
    back = from_lavis(lavis)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    stage2 = create_stage2_model("tiny-stage2", [f"llm.path={llm_dirs['t5']}"])
    no_key_bias_(stage2)
    state2 = {k: v for k, v in stage2.state_dict().items() if not k.startswith("llm.")}
    lavis2 = to_lavis(state2, stage=2, llm="t5")
    assert "t5_proj.weight" in lavis2 and not any(k.startswith("Qformer.cls") for k in lavis2)
    back2 = from_lavis(lavis2, stage=2)
    assert set(back2) == set(state2) and all(torch.equal(back2[k], state2[k]) for k in state2)


@pytest.mark.parametrize("change, says", [
    (lambda s: s.pop("itm_head.weight"), "1 missing ['itm_head.weight']"),
    (lambda s: s.__setitem__("Qformer.bert.encoder.layer.0.attention.self.extra", torch.zeros(1)), "map to nothing"),
    (lambda s: s.__setitem__("vision_proj.weight", torch.zeros(3, 3)), "vision_proj.weight (3, 3) vs (16, 32)"),
    (lambda s: s.__setitem__("mystery.weight", torch.zeros(1)), "['mystery.weight']"),
    (lambda s: s.__setitem__("Qformer.cls.predictions.decoder.weight", torch.zeros(100, 32)), "differs from"),
])
def test_a_checkpoint_that_does_not_fit_is_rejected_by_name(hf_retrieval, tmp_path, change, says):
    lavis = lavis_state_from_hf(hf_retrieval.state_dict())
    lavis["vision_proj.weight"] = lavis["vision_proj.weight"].clone()
    change(lavis)
    path = save_lavis(tmp_path / "bad.pth", lavis)
    with pytest.raises(ConfigError) as caught:
        load_lavis_weights(tiny_model(), path)
    assert says in str(caught.value) and str(path) in str(caught.value), str(caught.value)


def lavis_real_size_keys() -> dict[str, tuple]:
    """The key set and shapes of LAVIS's `Blip2Qformer` (pretrain): EVA ViT-g as `create_eva_vit_g` builds it
    (39 blocks of 1408, MLP 6144, patch 14 at 224 px) and bert-base with cross-attention every 2nd layer."""
    shapes = {
        "visual_encoder.cls_token": (1, 1, 1408), "visual_encoder.pos_embed": (1, 257, 1408),
        "visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14), "visual_encoder.patch_embed.proj.bias": (1408,),
        "ln_vision.weight": (1408,), "ln_vision.bias": (1408,), "query_tokens": (1, 32, 768), "temp": (),
        "vision_proj.weight": (256, 768), "vision_proj.bias": (256,), "text_proj.weight": (256, 768),
        "text_proj.bias": (256,), "itm_head.weight": (2, 768), "itm_head.bias": (2,),
        "Qformer.bert.embeddings.word_embeddings.weight": (30523, 768),
        "Qformer.bert.embeddings.position_embeddings.weight": (512, 768),
        "Qformer.bert.embeddings.LayerNorm.weight": (768,), "Qformer.bert.embeddings.LayerNorm.bias": (768,),
        "Qformer.cls.predictions.bias": (30523,), "Qformer.cls.predictions.transform.dense.weight": (768, 768),
        "Qformer.cls.predictions.transform.dense.bias": (768,), "Qformer.cls.predictions.transform.LayerNorm.weight": (768,),
        "Qformer.cls.predictions.transform.LayerNorm.bias": (768,),
    }
    for i in range(39):
        b = f"visual_encoder.blocks.{i}."
        shapes.update({b + "norm1.weight": (1408,), b + "norm1.bias": (1408,), b + "norm2.weight": (1408,),
                       b + "norm2.bias": (1408,), b + "attn.qkv.weight": (3 * 1408, 1408), b + "attn.q_bias": (1408,),
                       b + "attn.v_bias": (1408,), b + "attn.proj.weight": (1408, 1408), b + "attn.proj.bias": (1408,),
                       b + "mlp.fc1.weight": (6144, 1408), b + "mlp.fc1.bias": (6144,), b + "mlp.fc2.weight": (1408, 6144),
                       b + "mlp.fc2.bias": (1408,)})
    for i in range(12):
        b = f"Qformer.bert.encoder.layer.{i}."
        parts = [("attention", 768)] + ([("crossattention", 1408)] if i % 2 == 0 else [])
        for part, width in parts:
            for p in ("query", "key", "value"):
                inner = 768 if p == "query" else width
                shapes.update({f"{b}{part}.self.{p}.weight": (768, inner), f"{b}{part}.self.{p}.bias": (768,)})
            shapes.update({f"{b}{part}.output.dense.weight": (768, 768), f"{b}{part}.output.dense.bias": (768,),
                           f"{b}{part}.output.LayerNorm.weight": (768,), f"{b}{part}.output.LayerNorm.bias": (768,)})
        for side in ("", "_query"):
            shapes.update({f"{b}intermediate{side}.dense.weight": (3072, 768), f"{b}intermediate{side}.dense.bias": (3072,),
                           f"{b}output{side}.dense.weight": (768, 3072), f"{b}output{side}.dense.bias": (768,),
                           f"{b}output{side}.LayerNorm.weight": (768,), f"{b}output{side}.LayerNorm.bias": (768,)})
    return shapes


def test_the_real_size_lavis_key_set_maps_onto_our_lavis_config():
    shapes = lavis_real_size_keys()
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.bert.embeddings.word_embeddings.weight"]
    state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    converted = from_lavis(state)
    with torch.device("meta"):
        ours = Blip2Stage1(load_model_config("blip2-lavis-vitg", ["qformer.bert=null"]))
    own = ours.state_dict()
    assert set(converted) == set(own), (sorted(set(own) - set(converted))[:5], sorted(set(converted) - set(own))[:5])
    assert all(converted[k].shape == own[k].shape for k in own)
    assert set(to_lavis(converted)) == set(state)


def test_lavis_files_load_through_the_factory(hf_retrieval, tmp_path):
    """`lavis_checkpoint=` loads LAVIS's stage-1 file; `vision.checkpoint=` takes LAVIS's `eva_vit_g.pth` for a vit
    (40 blocks in the file, the first `depth` kept, the final norm left out, as LAVIS builds its ViT)."""
    from lavis_lite import create_model

    lavis = lavis_state_from_hf(hf_retrieval.state_dict())
    eva = {k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    for key in [k for k in eva if k.startswith("blocks.1.")]:
        eva[key.replace("blocks.1.", "blocks.2.")] = torch.randn_like(eva[key])  # a block LAVIS does not run
    eva["norm.weight"], eva["norm.bias"] = torch.ones(32), torch.zeros(32)
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    stage1 = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}  # LAVIS ships the ViT apart
    save_lavis(tmp_path / "blip2_pretrained.pth", stage1)
    model, _ = create_model("tiny", [f"vision.checkpoint={tmp_path / 'eva_vit_g.pth'}",
                                     f"lavis_checkpoint={tmp_path / 'blip2_pretrained.pth'}"])
    expected = from_lavis(lavis)
    state = model.state_dict()
    assert set(expected) == set(state)
    assert all(torch.equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("config, llm, width", [("blip2-lavis-opt2.7b", "opt", 2560), ("blip2-lavis-flant5xl", "t5", 2048)])
def test_the_real_size_lavis_stage2_key_set_maps_onto_our_configs(config, llm, width):
    """LAVIS's `Blip2OPT` / `Blip2T5` trained keys (ln_vision, queries, the Q-Former without its text side, the
    projection) on the meta device: no missing or unexpected key, every shape equal."""
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    from lavis_lite.config import Stage2ModelConfig, merge_config, named_config
    from lavis_lite.models.stage2_model import Blip2Stage2
    from tiny_llm import word_tokenizer

    text_side = re.compile(r"^Qformer\.(cls\.|bert\.embeddings\.(word|position)_|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)")
    shapes = {k: s for k, s in lavis_real_size_keys().items()
              if not k.startswith(("visual_encoder.", "vision_proj", "text_proj", "itm_head", "temp")) and not text_side.match(k)}
    shapes[f"{llm}_proj.weight"], shapes[f"{llm}_proj.bias"] = (width, 768), (width,)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        language = (OPTForCausalLM(OPTConfig(hidden_size=2560, word_embed_proj_dim=2560, num_hidden_layers=1, ffn_dim=10240, num_attention_heads=32))
                    if llm == "opt" else T5ForConditionalGeneration(T5Config(d_model=2048, num_layers=1, num_decoder_layers=1, d_ff=5120, num_heads=32, d_kv=64)))
        cfg = merge_config(Stage2ModelConfig, [named_config(config)], ["vision.checkpoint=null", "lavis_checkpoint=null", "llm.stop_text=null"])
        ours = Blip2Stage2(cfg, language, word_tokenizer())
    own = {k: v for k, v in ours.state_dict().items() if not k.startswith(("llm.", "vision."))}
    converted = from_lavis(state, stage=2)
    assert set(converted) == set(own), (sorted(set(own) - set(converted))[:5], sorted(set(converted) - set(own))[:5])
    assert all(converted[k].shape == own[k].shape for k in own)
