"""`python -m stage2.caption` and `lavis_lite.inference.preprocess` on an untrained tiny stage-2 checkpoint.

The checkpoint's vision encoder is a tiny timm CNN loaded from a weights file, so that the CLI's process
rebuilds exactly the encoder this process holds (a kind "vit" encoder would be drawn at random).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import tiny_config, tiny_model
from tiny_llm import save_tiny_llm
from lavis_lite.checkpoint import save_checkpoint
from lavis_lite.config import VisionConfig
from lavis_lite.data.transforms import PairTransform
from lavis_lite.inference.preprocess import ImageError, caption_images, image_processor, load_images
from lavis_lite.models.factory import create_stage2_model
from lavis_lite.models.vision import build_vision_encoder
from stage1.config import Stage1Config
from stage2 import caption
from stage2.config import Stage2Config

ROOT = Path(__file__).resolve().parent.parent
VISION = dict(kind="timm", name="test_efficientnet", image_size=32, precision="fp32")
SETTINGS = ["--num-beams", "2", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved stage-2 checkpoint with random trainable weights, the model itself, and three PNG files."""
    root = tmp_path_factory.mktemp("caption")
    torch.manual_seed(0)
    trunk = build_vision_encoder(VisionConfig(**VISION)).trunk
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(root / "vision.safetensors"))
    overrides = [f"llm.path={save_tiny_llm('llama', root)}", *(f"vision.{k}={v}" for k, v in VISION.items()),
                 f"vision.checkpoint={root / 'vision.safetensors'}"]
    model = create_stage2_model("tiny-stage2", overrides)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random weights: the image decides the caption
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    save_checkpoint(root / "run", 7, model, {}, Stage2Config(model=model.cfg))
    rng = np.random.default_rng(0)
    images = []
    files = [("rgb.png", "RGB", (30, 40, 3)), ("grey.png", "L", (50, 20)), ("rgba.png", "RGBA", (32, 32, 4))]
    for name, mode, shape in files:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name)
        images.append(root / name)
    return root, model, images


def reference(model, paths: list[Path], prompt: str | list[str] | None = None) -> list[str]:
    """What `model.generate` says in this process, for the CLI's batches of two, from the eval transform."""
    transform = PairTransform(32, model.vision.mean, model.vision.std, train=False)
    pixels = torch.stack([transform(Image.open(p).convert("RGB"), "")[0] for p in paths])
    prompts = (prompt, prompt) if prompt is None or isinstance(prompt, str) else (prompt[:2], prompt[2:])
    batches = zip((pixels[:2], pixels[2:]), prompts)
    return [c for batch, p in batches for c in model.generate(batch, prompt=p, num_beams=2, max_new_tokens=6)]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stage2.caption", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_captions_each_image_as_generate_does(setup):
    root, model, images = setup
    expected = reference(model, images)
    assert len(set(expected)) > 1, "the images should get different captions, or the test shows nothing"
    done = cli("--checkpoint", str(root / "run"), *map(str, images), *SETTINGS, "--batch-size", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"{p}\t{c}" for p, c in zip(images, expected)]


def test_prompt_reaches_the_model(setup, capsys):
    root, model, images = setup
    prompt = "question : what colour is the circle ? answer :"
    expected = reference(model, images, prompt)
    assert expected != reference(model, images), "the prompt should change the captions"
    args = ["--checkpoint", str(root / "run"), *map(str, images), *SETTINGS, "--batch-size", "2", "--prompt", prompt]
    assert caption.main(args) == 0
    assert capsys.readouterr().out.splitlines() == [f"{p}\t{c}" for p, c in zip(images, expected)]


def errors(capsys, *args: str) -> str:
    assert caption.main(list(args)) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1  # one line, no traceback
    return out.err


def test_bad_inputs_are_named(setup, tmp_path, capsys):
    root, _, images = setup
    run = ["--checkpoint", str(root / "run")]
    missing = errors(capsys, "--checkpoint", str(tmp_path / "nowhere"), str(images[0]))
    assert f"no checkpoint at {tmp_path / 'nowhere'}: give a run directory" in missing
    gone = tmp_path / "gone.png"
    assert f"image not found: {gone}" in errors(capsys, *run, str(images[0]), str(gone))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(images[0].read_bytes()[:60])  # a PNG cut off after its header
    assert f"cannot read image {corrupt}" in errors(capsys, *run, str(corrupt))
    assert "no images given" in errors(capsys, *run)
    if not torch.cuda.is_available():
        assert "--device cpu" in errors(capsys, *run, str(images[0]), "--device", "cuda")
    stage1 = tmp_path / "stage1"
    save_checkpoint(stage1, 1, tiny_model(), {}, Stage1Config(model=tiny_config()))
    assert "is not a stage-2 checkpoint" in errors(capsys, "--checkpoint", str(stage1), str(images[0]))


def test_help_describes_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_:
        caption.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--checkpoint DIR" in text and "--batch-size" in text
    assert "Question: what colour is the circle? Answer:" in text


def test_image_processor_is_the_eval_transform(setup):
    root, model, images = setup
    assert model.vision.mean != (0.48145466, 0.4578275, 0.40821073)  # timm's ImageNet statistics, not CLIP's
    transform = PairTransform(32, model.vision.mean, model.vision.std, train=False)
    grey = Image.open(images[1])
    pixels = image_processor(model)(grey)
    assert pixels.shape == (3, 32, 32)
    assert torch.equal(pixels, transform(grey.convert("RGB"), "")[0])
    batch = load_images([images[0], grey], image_processor(model))
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[1], pixels)
    with pytest.raises(ImageError, match="image not found: .*missing.png"):
        load_images([root / "missing.png"], image_processor(model))


def test_caption_images_takes_paths_or_images_and_a_prompt_each(setup):
    _, model, images = setup
    prompts = ["question : how many shapes ? answer :", "a photo of", "what colour is the circle ?"]
    inputs = [images[0], Image.open(images[1]), str(images[2])]
    said = caption_images(model, inputs, prompt=prompts, batch_size=2, num_beams=2, max_new_tokens=6)
    assert said == reference(model, images, prompts)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        caption_images(model, images, prompt=prompts[:2])
