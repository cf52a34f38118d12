"""BLIP-2's image transforms and caption cleaning, with flips that keep positional captions true."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from lavis_lite.data.config import MAX_IMAGE_PIXELS, DataConfig
from lavis_lite.errors import UserError

BICUBIC = T.InterpolationMode.BICUBIC
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


class ImageError(UserError):
    """An image file that cannot be used; the message names the file and the problem."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the limit allows (checked before it is decoded)."""


def decode_image(source: str | Path | bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A file's or encoded bytes' image in RGB (`to_rgb`), decoded in full so that truncated data fails here.
    FileNotFoundError for a missing file; ImageTooLarge / ImageError naming `name` otherwise."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as raw:
            return to_rgb(raw, max_pixels)
    except FileNotFoundError:
        raise
    except (ImageTooLarge, Image.DecompressionBombError) as err:
        raise ImageTooLarge(f"image {name} is too large: {err}") from None
    except Exception as err:  # PIL raises many types on bad bytes (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageError(f"cannot read image {name}: {err or type(err).__name__} (is it a valid image file?)") from None


def to_rgb(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A decoded image as users mean it, in RGB: turned upright by its EXIF orientation, and high bit depths
    (16-bit and 32-bit integer, float) scaled by their value range instead of clipped to white. An image of
    more than `max_pixels` pixels raises ImageTooLarge before anything is decoded."""
    if image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{image.width} x {image.height} pixels, over the limit of {max_pixels:,}")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        if image.mode.startswith("I;16") or top > 255.0:  # 16-bit data (PNGs open as I;16 or I)
            scale = 255.0 / 65535.0
        else:
            scale = 255.0 if image.mode == "F" and top <= 1.0 else 1.0
        image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def clean_caption(text: str, max_words: int = 50, lowercase: bool = True) -> str:
    """LAVIS's `BlipCaptionProcessor.pre_caption`: lowercase, punctuation to spaces, collapse spaces, truncate.

    Any whitespace run becomes one space (LAVIS keeps single tabs/newlines; the BERT tokenizer sees no
    difference), so a caption of only whitespace and punctuation cleans to "". `lowercase=False` leaves case
    to the tokenizer (the evaluation-time processor of `lavis_lite.inference.features`).
    """
    words = _PUNCTUATION.sub(" ", text.lower() if lowercase else text).split()
    return " ".join(words[:max_words])


def swap_left_right(caption: str) -> str:
    """Swap the words "left" and "right": the caption of a horizontally flipped image."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


class PairTransform:
    """Image + caption preprocessing for training (`train=True`) or evaluation.

    Training: RandomResizedCrop(image_size, scale=crop_scale, bicubic), a horizontal flip with probability 0.5
    (`hflip`), ToTensor, Normalize(mean, std). A flip mirrors left and right, so captions that say where
    things are become false; `flip_swaps_left_right=True` swaps the words "left" and "right" in the caption
    whenever the image is flipped (use it, or `hflip=False`, for positional captions such as the synthetic
    data's). Evaluation: bicubic resize to image_size x image_size, ToTensor, Normalize; captions unchanged.
    Randomness comes from torch's generator, which DataLoader seeds per worker.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        crop_scale: Sequence[float] = (0.5, 1.0),
        hflip: bool = True,
        flip_swaps_left_right: bool = False,
        max_words: int = 50,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.hflip = train and hflip
        self.max_pixels = max_pixels
        self.flip_swaps_left_right = flip_swaps_left_right
        self.max_words = max_words
        if train:
            self.resize = T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=BICUBIC)
        else:
            self.resize = T.Resize((image_size, image_size), interpolation=BICUBIC)
        # ToTensor + Normalize in numpy, two passes into a preallocated CHW array: half the time of
        # torchvision's at 224 px, and no per-sample torch ops, which in a main-process (num_workers=0)
        # loader use, and on a busy machine wait for, torch's intra-op threads.
        self.offset = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1) * 255
        self.scale = 1 / (np.asarray(std, dtype=np.float32).reshape(3, 1, 1) * 255)

    @classmethod
    def from_config(
        cls, cfg: DataConfig, image_size: int, mean: Sequence[float], std: Sequence[float], *, train: bool
    ) -> PairTransform:
        """The training or evaluation transform that a DataConfig describes."""
        return cls(
            image_size,
            mean,
            std,
            train=train,
            crop_scale=cfg.crop_scale,
            hflip=cfg.hflip,
            flip_swaps_left_right=cfg.flip_swaps_left_right,
            max_words=cfg.max_words,
            max_pixels=cfg.max_image_pixels,
        )

    def clean(self, caption: str) -> str:
        """The caption as the model sees it, before any flip (empty means: skip the sample)."""
        return clean_caption(caption, self.max_words)

    def __call__(self, image: Image.Image, caption: str) -> tuple[torch.Tensor, str]:
        """A normalised [3, image_size, image_size] tensor and the (possibly left/right-swapped) caption."""
        image = self.resize(image)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.flip_swaps_left_right:
                caption = swap_left_right(caption)
        pixels = np.empty((3, image.height, image.width), dtype=np.float32)
        np.subtract(np.asarray(image).transpose(2, 0, 1), self.offset, out=pixels)  # uint8 HWC view -> float CHW
        pixels *= self.scale
        return torch.from_numpy(pixels), caption
