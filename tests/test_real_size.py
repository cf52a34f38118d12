"""The paper's stage-1 model, built on the meta device: parameter counts match BLIP-2's."""

import torch

from lavis_lite import create_model


def test_paper_stage1_parameter_counts():
    with torch.device("meta"):
        model, _ = create_model("blip2-stage1-vitg", ["qformer.bert=null", "vision.checkpoint=null"])
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    qformer = count(model) - count(model.vision) - count(model.ln_vision)
    # BLIP-2: "Q-Former ... contains 188M parameters" (bert-base + cross-attention + query FFN + queries + heads).
    assert 185e6 < qformer < 190e6, qformer
    assert model.query_tokens.shape == (1, 32, 768)
    cross = [i for i, layer in enumerate(model.qformer.layers) if layer.cross_attn is not None]
    assert cross == [0, 2, 4, 6, 8, 10]
    assert model.qformer.layers[0].cross_attn.kv.weight.shape == (2 * 768, 1408)
    assert (model.vision_proj.out_features, model.text_proj.out_features, model.itm_head.out_features) == (256, 256, 2)
    # EVA01-g-14 is ~1.0B parameters; BLIP-2 drops its last block (39 of 40 kept).
    assert 0.95e9 < count(model.vision) < 1.02e9, count(model.vision)
    assert model.vision.width == 1408
    assert all(not p.requires_grad for p in model.vision.parameters())
