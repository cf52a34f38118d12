"""The data section of a training recipe (an omegaconf structured dataclass, like `lavis_lite.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lavis_lite.config import at_least

MAX_IMAGE_PIXELS = 64_000_000  # images with more pixels are refused before they are decoded (~190 MB in RGB)


@dataclass
class DataConfig:
    """Where image-text shards are and how batches are made from them.

    Image size, normalisation and the text length come from the model (`VisionConfig.image_size`, the
    vision encoder's `.mean` / `.std`, `ModelConfig.max_text_len`), not from here.
    """

    train_shards: str = ""  # brace pattern ("dir/shard-{000000..000099}.tar") or a directory of .tar shards
    val_shards: str = ""
    batch_size: int = 32  # per process
    num_workers: int = 4  # DataLoader worker processes per process
    shuffle_buffer: int = 2000  # samples each worker shuffles among (training)
    resampled: bool = True  # training draws shards with replacement, forever (step-based training)
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop area range
    hflip: bool = True
    flip_swaps_left_right: bool = False  # True for positional captions (see PairTransform)
    max_words: int = 50  # captions are truncated to this many words before tokenisation
    seed: int = 0
    # Without augmentation the frozen encoder's tokens never change: compute them once and train on them.
    cache_features: bool = False
    cache_dir: str = "data/cache"
    trace_encoder: bool = True  # torch.jit.trace + freeze a CNN encoder while caching on CPU (2.3x faster)
    # Images per frozen-encoder call while caching on CPU: a small batch's activations stay in the CPU's caches
    # (EfficientNet-Lite0 at 128 px: 1.95x faster at 16 than at 128, benchmarks/encoder_batch.py). On CUDA the
    # loader's whole batch.
    cache_micro_batch: int = 16
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped as image_too_large

    def __post_init__(self) -> None:
        at_least("data", self, batch_size=1, num_workers=0, shuffle_buffer=1, max_words=1, max_image_pixels=1,
                 cache_micro_batch=1)
