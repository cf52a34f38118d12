"""lavis_lite: BLIP-2's Q-Former, trained and served.

The public names below load on first use, so that torch-free parts (`lavis_lite.io`) import without torch.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "Blip2FeatureExtractor": ".features",
    "Blip2Stage1": ".stage1_model",
    "BlipOutputFeatures": ".features",
    "ConfigError": ".config",
    "ModelConfig": ".config",
    "UserError": ".errors",
    "list_models": ".config",
    "QFormer": ".qformer",
    "QFormerConfig": ".config",
    "Stage1Output": ".stage1_model",
    "VisionConfig": ".config",
    "build_attention_mask": ".masks",
    "create_model": ".factory",
    "create_tokenizer": ".factory",
    "load_model_and_preprocess": ".features",
    "load_model_config": ".config",
    "load_stage1_checkpoint": ".factory",
    "merge_config": ".config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lavis_lite' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
