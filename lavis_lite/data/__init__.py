"""Image-text data: webdataset shards and annotation files to batches, transforms, skips, the training stream
and held-out split of a recipe, and the frozen encoder's token cache."""

from lavis_lite.data.annotations import (
    AnnotationDataset,
    Record,
    RetrievalSet,
    create_annotation_loader,
    read_karpathy,
    read_karpathy_eval,
    read_table,
)
from lavis_lite.data.config import DataConfig
from lavis_lite.data.samples import Collator, Sample, Skip, SkipCounter, caption_id
from lavis_lite.data.transforms import PairTransform, clean_caption, swap_left_right
from lavis_lite.data.webdataset_pipeline import build_wds_pipeline, create_wds_loader, list_shards

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
