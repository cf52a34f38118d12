"""`lavis-lite convert` through all three layouts: HF dir -> LAVIS .pth -> ours -> HF dir gives back the same
HF weights, and each intermediate loads into a model with the same scores."""

import torch
from safetensors.torch import load_file

from conftest import redraw_, text_batch, tiny_model
from lavis_lite import cli, save_pretrained
from lavis_lite.interop.convert_lavis import from_lavis
from lavis_lite.models.factory import load_stage1_checkpoint


def test_hf_to_lavis_to_ours_to_hf_is_the_identity(images, tmp_path, capsys):
    model = tiny_model().eval()
    redraw_(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                param.chunk(3)[1].zero_()  # LAVIS's EVA attention has no key bias
    save_pretrained(model, tmp_path / "hf")
    assert cli.main(["convert", "--from", "hf", "--to", "lavis", str(tmp_path / "hf"), str(tmp_path / "blip2.pth")]) == 0
    lavis = torch.load(tmp_path / "blip2.pth", weights_only=True)["model"]
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in lavis and "visual_encoder.blocks.0.attn.q_bias" in lavis
    assert cli.main(["convert", "--from", "lavis", "--to", "ours", str(tmp_path / "blip2.pth"), str(tmp_path / "ours"),
                     "--model", "tiny", "vision.precision=fp32"]) == 0
    ours, _ = load_stage1_checkpoint(tmp_path / "ours")
    expected = from_lavis(lavis)
    assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())
    ids, mask = text_batch(3, 5, 100, [5, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(ours.itm_logits(ours.encode_image(images[:3]), ids, mask),
                                   model.itm_logits(model.encode_image(images[:3]), ids, mask), atol=1e-6, rtol=0)
    assert cli.main(["convert", "--from", "ours", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "hf-again")]) == 0
    first, again = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf-again" / "model.safetensors"))
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert "wrote" in capsys.readouterr().out


def test_lavis_without_an_architecture_is_one_error_line(tmp_path, capsys):
    (tmp_path / "x.pth").write_bytes(b"")
    assert cli.main(["convert", "--from", "lavis", "--to", "hf", str(tmp_path / "x.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --from lavis needs --model")
