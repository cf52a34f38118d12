"""Inference-time inputs: images as a model's vision encoder expects them, and captioning of image files."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn

from lavis_lite.data.config import MAX_IMAGE_PIXELS
from lavis_lite.data.transforms import ImageError, ImageTooLarge, PairTransform, decode_image
from lavis_lite.models.stage2_model import Blip2Stage2

ImageInput = Union[Image.Image, str, Path]
__all__ = ["ImageError", "ImageTooLarge", "ImageInput", "caption_images", "image_processor", "load_images", "open_image"]


def image_processor(model: nn.Module) -> Callable[[Image.Image], Tensor]:
    """The evaluation transform of `model`'s vision encoder (a stage-1 or stage-2 model): any PIL image ->
    RGB, bicubic resize to `cfg.vision.image_size` square, normalised with the encoder's mean and std."""
    transform = PairTransform(model.cfg.vision.image_size, model.vision.mean, model.vision.std, train=False)

    def process(image: Image.Image) -> Tensor:
        return transform(image.convert("RGB"), "")[0]

    return process


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A file's image, decoded in RGB; `ImageError` naming the file when it is missing, unreadable or larger
    than `max_pixels` (`ImageTooLarge`)."""
    try:
        return decode_image(path, str(path), max_pixels)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path} (check the path)") from None


def load_images(images: Sequence[ImageInput], processor: Callable[[Image.Image], Tensor]) -> Tensor:
    """A batch `[N, 3, S, S]` of images given as PIL images or file paths (opened with `open_image`)."""
    return torch.stack([processor(open_image(i) if isinstance(i, (str, Path)) else i) for i in images])


def caption_images(
    model: Blip2Stage2,
    images: Sequence[ImageInput],
    prompt: Optional[str | Sequence[str]] = None,
    batch_size: int = 16,
    **generate_kwargs,
) -> list[str]:
    """Captions of images (PIL images or file paths), `batch_size` at a time, one per image in order (or
    `num_captions` each). `prompt`: None (the model's), one for all, or one per image, e.g. "Question: what
    colour is the circle? Answer:" for VQA. Other arguments go to `Blip2Stage2.generate` (num_beams, ...)."""
    if prompt is not None and not isinstance(prompt, str) and len(prompt) != len(images):
        raise ValueError(f"{len(prompt)} prompts for {len(images)} images: give one prompt, or one per image")
    process = image_processor(model)
    device = model.language_projection.weight.device
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        pixels = load_images(images[start : start + batch_size], process).to(device)
        batch_prompt = prompt if prompt is None or isinstance(prompt, str) else prompt[start : start + batch_size]
        captions += model.generate(pixels, prompt=batch_prompt, **generate_kwargs)
    return captions
