"""lavis_lite: BLIP-2's Q-Former, trained and served.

The public names below load on first use, so that torch-free parts (`lavis_lite.io`) import without torch.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "Blip2FeatureExtractor": ".inference.features",
    "Blip2Stage1": ".models.stage1_model",
    "BlipOutputFeatures": ".inference.features",
    "ConfigError": ".config",
    "ModelConfig": ".config",
    "UserError": ".errors",
    "list_models": ".config",
    "QFormer": ".models.qformer",
    "QFormerConfig": ".config",
    "Stage1Output": ".models.stage1_model",
    "VisionConfig": ".config",
    "build_attention_mask": ".models.masks",
    "create_model": ".models.factory",
    "create_tokenizer": ".models.factory",
    "from_pretrained": ".interop.hf_pretrained",
    "save_pretrained": ".interop.hf_pretrained",
    "load_model_and_preprocess": ".inference.features",
    "load_model_config": ".config",
    "load_stage1_checkpoint": ".models.factory",
    "merge_config": ".config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lavis_lite' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
