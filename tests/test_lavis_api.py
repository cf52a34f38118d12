"""LAVIS's own examples (its README's feature extraction, its image-text matching notebook, its captioning
example), with only the import changed, run against tiny LAVIS-layout weights in a local model directory."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import redraw_, save_bert_tokenizer, tiny_model
from lavis_lite.errors import MissingFileError, UserError
from lavis_lite.interop.convert_lavis import to_lavis
from lavis_lite.models.factory import create_stage2_model
from test_lavis_interop import no_key_bias_
from tiny_llm import save_tiny_llm

REPO = Path(__file__).resolve().parent.parent

FEATURES = '''
from lavis_lite import load_model_and_preprocess
model, vis_processors, txt_processors = load_model_and_preprocess(name="blip2_feature_extractor", model_type="pretrain", is_eval=True, device=device)
image = vis_processors["eval"](raw_image).unsqueeze(0).to(device)
text_input = txt_processors["eval"](caption)
sample = {"image": image, "text_input": [text_input]}
features_multimodal = model.extract_features(sample)
features_image = model.extract_features(sample, mode="image")
features_text = model.extract_features(sample, mode="text")
similarity = (features_image.image_embeds_proj @ features_text.text_embeds_proj[:, 0, :].t()).max()
'''
MATCHING = '''
from lavis_lite import load_model_and_preprocess
model, vis_processors, text_processors = load_model_and_preprocess("blip2_image_text_matching", "pretrain", device=device, is_eval=True)
img = vis_processors["eval"](raw_image).unsqueeze(0).to(device)
txt = text_processors["eval"](caption)
itm_output = model({"image": img, "text_input": txt}, match_head="itm")
itm_scores = torch.nn.functional.softmax(itm_output, dim=1)
itc_score = model({"image": img, "text_input": txt}, match_head="itc")
'''
CAPTIONING = '''
from lavis_lite import load_model_and_preprocess
model, vis_processors, _ = load_model_and_preprocess(name="blip2_opt", model_type="pretrain_opt2.7b", is_eval=True, device=device)
image = vis_processors["eval"](raw_image).unsqueeze(0).to(device)
captions = model.generate({"image": image})
answers = model.generate({"image": image, "prompt": "question : what colour is the star ? answer :"})
sampled = model.generate({"image": image}, use_nucleus_sampling=True, num_captions=3)
'''


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A local model directory in LAVIS's file layout, with tiny architectures in place of the real ones."""
    root = tmp_path / "weights"
    root.mkdir()
    save_bert_tokenizer(root / "bert-base-uncased", [f"w{i}" for i in range(94)])  # 99 words + [DEC]: vocab 100
    (root / "blip2-lavis-vitg.yaml").write_text((REPO / "configs/model/tiny.yaml").read_text())
    model = tiny_model()
    redraw_(model)
    no_key_bias_(model)
    lavis = to_lavis({k: v for k, v in model.state_dict().items()})
    torch.save({"model": {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}}, root / "blip2_pretrained.pth")
    torch.save({k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}, root / "eva_vit_g.pth")
    shutil.copytree(save_tiny_llm("opt", tmp_path), root / "opt-2.7b")
    (root / "blip2-lavis-opt2.7b.yaml").write_text((REPO / "configs/model/tiny-stage2.yaml").read_text())
    stage2 = create_stage2_model("tiny-stage2", [f"llm.path={root / 'opt-2.7b'}"])
    redraw_(stage2.qformer, std=0.3)
    no_key_bias_(stage2)
    trained = {k: v for k, v in stage2.state_dict().items() if not k.startswith(("llm.", "vision."))}
    torch.save({"model": to_lavis(trained, stage=2, llm="opt")}, root / "blip2_pretrained_opt2.7b.pth")
    monkeypatch.setenv("LAVIS_LITE_WEIGHTS", str(root))
    return root, model


def run(example: str) -> dict:
    namespace = {"torch": torch, "device": "cpu", "raw_image": Image.new("RGB", (50, 40), (200, 30, 30)), "caption": "a red square"}
    exec(compile(example, "lavis-example", "exec"), namespace)
    return namespace


def test_lavis_feature_extraction_example_runs(weights):
    out = run(FEATURES)
    assert out["features_image"].image_embeds_proj.shape == (1, 8, 16)
    assert out["features_multimodal"].multimodal_embeds.shape == (1, 8, 32)
    assert -1 <= float(out["similarity"]) <= 1


def test_lavis_image_text_matching_example_runs_with_our_weights(weights):
    _, reference = weights
    out = run(MATCHING)
    assert out["itm_output"].shape == (1, 2) and torch.allclose(out["itm_scores"].sum(1), torch.ones(1))
    assert out["itc_score"].shape == (1, 1)
    model = out["model"]
    loaded = model.extractor.model.itm_head.weight  # LAVIS's file's, cast to the precision the machine runs
    assert torch.equal(loaded, reference.itm_head.weight.to(loaded.dtype))


def test_lavis_captioning_example_runs(weights):
    out = run(CAPTIONING)
    assert len(out["captions"]) == 1 and len(out["answers"]) == 1 and len(out["sampled"]) == 3
    assert all(isinstance(c, str) for c in out["captions"] + out["answers"] + out["sampled"])


def test_a_missing_lavis_file_says_which_and_where(weights):
    root, _ = weights
    (root / "eva_vit_g.pth").unlink()
    from lavis_lite import load_model_and_preprocess

    with pytest.raises(MissingFileError, match=r"put eva_vit_g.pth in .*storage.googleapis.com"):
        load_model_and_preprocess(name="blip2_feature_extractor", model_type="pretrain")
    with pytest.raises(MissingFileError, match="has no model_type 'bogus'"):
        load_model_and_preprocess(name="blip2_opt", model_type="bogus")
    with pytest.raises(UserError, match="is a weights file"):
        load_model_and_preprocess(str(root / "blip2_pretrained.pth"))
