"""lavis_lite: BLIP-2's Q-Former, trained and served."""

from .config import ConfigError, ModelConfig, QFormerConfig, VisionConfig, load_model_config, merge_config
from .factory import create_model, create_tokenizer, load_stage1_checkpoint
from .features import Blip2FeatureExtractor, BlipOutputFeatures, load_model_and_preprocess
from .masks import build_attention_mask
from .qformer import QFormer
from .stage1_model import Blip2Stage1, Stage1Output

__all__ = [
    "Blip2FeatureExtractor",
    "Blip2Stage1",
    "BlipOutputFeatures",
    "ConfigError",
    "ModelConfig",
    "QFormer",
    "QFormerConfig",
    "Stage1Output",
    "VisionConfig",
    "build_attention_mask",
    "create_model",
    "create_tokenizer",
    "load_model_and_preprocess",
    "load_model_config",
    "load_stage1_checkpoint",
    "merge_config",
]
