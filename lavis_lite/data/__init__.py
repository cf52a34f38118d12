"""Image-text data: webdataset shards and annotation files to batches, transforms, skips, synthetic data."""

from .annotations import (
    AnnotationDataset,
    Record,
    RetrievalSet,
    create_annotation_loader,
    read_karpathy,
    read_karpathy_eval,
    read_table,
)
from .config import DataConfig
from .samples import Collator, Sample, Skip, SkipCounter, caption_id
from .transforms import PairTransform, clean_caption, swap_left_right
from .webdataset_pipeline import build_wds_pipeline, create_wds_loader, list_shards

__all__ = [
    "AnnotationDataset",
    "Collator",
    "DataConfig",
    "PairTransform",
    "Record",
    "RetrievalSet",
    "Sample",
    "Skip",
    "SkipCounter",
    "build_wds_pipeline",
    "caption_id",
    "clean_caption",
    "create_annotation_loader",
    "create_wds_loader",
    "list_shards",
    "read_karpathy",
    "read_karpathy_eval",
    "read_table",
    "swap_left_right",
]
