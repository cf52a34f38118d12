"""An index build recipe: the model, the corpus, what to index and how (an omegaconf structured config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lavis_lite.config import merge_config, recipe_path
from lavis_lite.data.config import MAX_IMAGE_PIXELS


@dataclass
class CorpusConfig:
    """Where the images (and captions) are; see `retrieval.corpus` for the kinds."""

    path: str = ""  # shards (directory / brace pattern / .tar), an image folder, or a .json / .jsonl / .csv file
    kind: str = "auto"  # auto | shards | folder | karpathy | table
    image_root: Optional[str] = None  # annotation files: root of their relative image paths (default: the file's folder)
    max_words: int = 50  # captions are cleaned and truncated as in training
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped as image_too_large


@dataclass
class BuildConfig:
    """`lavis-lite index`: embed a corpus with a stage-1 model and write a retrieval index."""

    checkpoint: str = ""  # stage-1 run or checkpoint directory (or any name `load_model_and_preprocess` takes)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    target: str = "image"  # image: one item per image (all its query vectors) | text: one item per caption
    output_dir: str = ""  # the index directory (an existing index there is replaced when the build finishes)
    resume: bool = True  # continue an interrupted build of output_dir; false: discard its chunks and start again
    batch_size: int = 64  # images or captions per forward pass
    chunk_size: int = 1024  # corpus images per index chunk (the unit of resume; bounds memory)
    num_workers: int = 4  # threads decoding and resizing images
    device: str = "auto"  # auto (cuda where available) | cpu | cuda
    precision: str = "auto"  # what the encoder and Q-Former compute in: auto | fp32 | bf16 | fp16 (lavis_lite.precision)
    index_type: str = "auto"  # see retrieval.index.INDEX_TYPES
    index_options: dict[str, Any] = field(default_factory=dict)  # passed to the index (e.g. nlist, M)
    # A folder written by `lavis-lite embed` (all its partitions): the index is built from those embeddings
    # instead of embedding `corpus` with `checkpoint` (both then unused).
    embeddings: str = ""


@dataclass
class EmbedConfig:
    """`lavis-lite embed`: a corpus to embeddings in clip-retrieval's layout, one partition per process."""

    checkpoint: str = ""  # stage-1 run or checkpoint directory
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    output_dir: str = ""  # img_emb/, img_emb_queries/, text_emb/, metadata/, partitions/
    # This process's share: partition i of n (contiguous runs of the corpus's entries, in corpus order).
    # num_partitions=0: from the launcher (RANK / WORLD_SIZE, as accelerate launch and torchrun set them), else 1.
    partition: int = 0
    num_partitions: int = 0
    batch_size: int = 64
    num_workers: int = 4
    device: str = "auto"
    precision: str = "auto"


TARGETS = ("image", "text")


def load_embed_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> EmbedConfig:
    """An EmbedConfig from an optional YAML and `key=value` overrides; unknown keys raise."""
    return merge_config(EmbedConfig, [recipe_path(path)] if path else [], overrides)


def load_build_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> BuildConfig:
    """A BuildConfig from a recipe (a YAML path or a packaged name such as `retrieval/demo`; none: the defaults)
    and `key=value` overrides; unknown keys raise."""
    return merge_config(BuildConfig, [recipe_path(path)] if path else [], overrides)
