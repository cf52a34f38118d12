"""Frozen image encoders behind one interface: a small BLIP-2/EVA-style ViT, timm models, open_clip towers.

Every encoder maps normalised pixels `[B, 3, H, W]` to float32 tokens `[B, N, C]`. Its parameters never
require grad, it stays in eval mode, and it runs under `torch.no_grad()` (not inference mode: the tokens
feed autograd graphs downstream) in the precision of `VisionConfig.precision`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavis_lite.checkpoint import read_state_dict
from lavis_lite.config import ConfigError, VisionConfig
from lavis_lite.errors import MissingFileError
from lavis_lite.precision import DTYPES, resolve_dtype

# open_clip's OPENAI_DATASET_MEAN/STD (BLIP-2's image processor) and timm's ImageNet defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class FrozenVisionEncoder(nn.Module):
    """A frozen trunk: no grad, always eval, runs in `precision`; subclasses define the tokens.

    `precision="auto"` is resolved on the first forward from the input's device (`lavis_lite.precision`: bf16
    where the device runs it natively, else fp16 on CUDA and fp32 on CPU) and the trunk is cast once;
    explicit precisions cast the trunk at construction.
    """

    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(
        self, trunk: nn.Module, width: int, mean: Sequence[float], std: Sequence[float], precision: str
    ) -> None:
        super().__init__()
        if precision != "auto":
            resolve_dtype(precision, key="vision.precision")  # rejects an unknown name
        self.trunk = trunk
        self.width = int(width)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.trunk.requires_grad_(False)
        self._precision_resolved = precision != "auto"
        if self._precision_resolved:
            self.trunk.to(DTYPES[precision])
        self.train(False)

    def train(self, mode: bool = True) -> FrozenVisionEncoder:
        """Stay in eval mode whatever `mode` a parent module passes down."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Normalised pixels `[B, 3, H, W]` -> float32 tokens `[B, N, width]`, computed without grad."""
        device_type = images.device.type
        if not self._precision_resolved:
            self.trunk.to(resolve_dtype("auto", images.device))
            self._precision_resolved = True
        dtype = next(self.trunk.parameters()).dtype
        # A parent's autocast would override the trunk's precision: run the trunk as configured.
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with torch.no_grad(), no_autocast:
            return self._tokens(images.to(dtype)).float()

    def _tokens(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def traceable(self) -> bool:
        """Whether `torch.jit.trace` captures this encoder for any batch size (CNNs; ViTs bake it in)."""
        return False

    def num_tokens(self, image_size: int) -> int:
        """Number of tokens N for a square image of side `image_size`."""
        raise NotImplementedError


# --- kind "vit": a small EVA/BLIP-2 ViT whose state dict maps 1:1 onto transformers' Blip2VisionModel ---


class _Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, cfg.width) * 0.02)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(images), -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.projection(out.transpose(1, 2).reshape(batch, length, width))


class _MLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EvaViT(nn.Module):
    """Pre-norm ViT with cls token and learned positions: all `depth` blocks, no final norm."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ConfigError(f"vision.width ({cfg.width}) must be divisible by vision.heads ({cfg.heads})")
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(self.embeddings(images))


class ViTEncoder(FrozenVisionEncoder):
    """kind "vit": an `EvaViT` trunk; `cfg.depth` is the number of blocks run (drop_last_block is unused)."""

    def __init__(self, cfg: VisionConfig) -> None:
        trunk = EvaViT(cfg)
        if cfg.checkpoint:
            _load_checkpoint_strict(trunk, cfg.checkpoint, cfg.depth)
        super().__init__(trunk, cfg.width, CLIP_MEAN, CLIP_STD, cfg.precision)
        self.patch_size = cfg.patch_size

    def _tokens(self, images: Tensor) -> Tensor:
        return self.trunk(images)

    def num_tokens(self, image_size: int) -> int:
        return (image_size // self.patch_size) ** 2 + 1


# --- timm trunks (kind "timm" and open_clip's timm-backed towers such as EVA01-g-14) ---


def _has_prefix_tokens(trunk: nn.Module) -> bool:
    """Whether a timm model is ViT-like: its `forward_intermediates` can return the prefix (cls) tokens."""
    method = getattr(trunk, "forward_intermediates", None)
    return method is not None and "return_prefix_tokens" in inspect.signature(method).parameters


def _prune_to_output_block(trunk: nn.Module, num_blocks: int, drop_last_block: bool) -> None:
    """Keep the blocks up to the output block; drop the final norm and head, which the tokens never use."""
    trunk.prune_intermediate_layers([num_blocks - 1 - int(drop_last_block)], prune_norm=True, prune_head=True)


class TimmEncoder(FrozenVisionEncoder):
    """A timm model. With `block_tokens` (ViT-like trunks) the tokens are the output of the block selected
    by `drop_last_block` (penultimate or last), prefix tokens included and no final norm; the unused
    blocks, final norm and head are removed. Otherwise `forward_features`, with a feature map flattened;
    `extra_levels` (CNNs) appends to each token the feature maps of those earlier levels (indices into the
    trunk's `feature_info`), each pooled to the final map's grid: one token per final cell that also carries
    what the earlier stages saw there (e.g. colour, which later stages of an ImageNet CNN carry less of)."""

    def __init__(
        self,
        trunk: nn.Module,
        *,
        block_tokens: bool,
        drop_last_block: bool,
        mean: Sequence[float],
        std: Sequence[float],
        precision: str,
        extra_levels: Sequence[int] = (),
        extra_levels_pool: str = "avg",
    ) -> None:
        if block_tokens:
            _prune_to_output_block(trunk, len(trunk.blocks), drop_last_block)
        self.extra_levels = [int(i) for i in extra_levels]
        width = trunk.num_features
        if self.extra_levels:
            width += sum(_level_channels(trunk, i, block_tokens) for i in self.extra_levels)
            if extra_levels_pool not in _POOLS:
                raise ConfigError(f"vision.extra_levels_pool='{extra_levels_pool}' is not one of {sorted(_POOLS)}")
        super().__init__(trunk, width, mean, std, precision)
        self.block_tokens = block_tokens
        self.pool = _POOLS[extra_levels_pool]
        if not block_tokens:  # CNNs: channels-last convolutions measured 1.6x faster on CPU (EfficientNet-Lite0)
            self.trunk.to(memory_format=torch.channels_last)

    @property
    def traceable(self) -> bool:
        return not self.block_tokens

    def _tokens(self, images: Tensor) -> Tensor:
        if self.block_tokens:
            ((patches, prefix),) = self.trunk.forward_intermediates(
                images, indices=1, return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
            )
            return torch.cat([prefix, patches], dim=1)
        images = images.contiguous(memory_format=torch.channels_last)
        if self.extra_levels:
            features, levels = self.trunk.forward_intermediates(images, indices=self.extra_levels)
            grid = features.shape[-2:]
            features = torch.cat([features, *(self.pool(level, grid) for level in levels)], dim=1)
        else:
            features = self.trunk.forward_features(images)
        if features.ndim == 4:
            if getattr(self.trunk, "output_fmt", "NCHW") == "NHWC":  # e.g. timm's Swin
                return features.flatten(1, 2)
            return features.flatten(2).transpose(1, 2)
        return features

    def num_tokens(self, image_size: int) -> int:
        if _has_prefix_tokens(self.trunk):
            height, width = self.trunk.patch_embed.dynamic_feat_size((image_size, image_size))
            return height * width + self.trunk.num_prefix_tokens
        param = next(self.trunk.parameters())
        return self(torch.zeros(1, 3, image_size, image_size, device=param.device)).shape[1]


def _load_checkpoint_strict(model: nn.Module, path: str | Path, eva_depth: Optional[int] = None) -> None:
    """Load a local weights file into `model`, raising a ConfigError naming the path and any bad keys. With
    `eva_depth` (kind "vit") a LAVIS EVA ViT file (`eva_vit_g.pth`) is converted first, its first blocks kept."""
    state = read_state_dict(path, "vision.checkpoint")
    if eva_depth is not None and "patch_embed.proj.weight" in state:
        from lavis_lite.interop.convert_lavis import from_lavis_eva

        prefix = "vision.trunk."
        state = {k[len(prefix) :]: v for k, v in from_lavis_eva(state, eva_depth, str(path)).items() if k.startswith(prefix)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"vision checkpoint {path} does not match the model: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"vision checkpoint {path} does not match the model: {err}") from None


_POOLS = {"avg": F.adaptive_avg_pool2d, "max": F.adaptive_max_pool2d}


def _level_channels(trunk: nn.Module, index: int, block_tokens: bool) -> int:
    """Channels of feature level `index` of a CNN trunk; a clear error for trunks without such levels."""
    info = getattr(trunk, "feature_info", None)
    if block_tokens or not isinstance(info, list) or not hasattr(trunk, "forward_intermediates"):
        raise ConfigError(
            f"vision.extra_levels needs a timm CNN with feature_info and forward_intermediates; "
            f"{type(trunk).__name__} is not one: set vision.extra_levels=[]"
        )
    if not 0 <= index < len(info) - 1:
        raise ConfigError(
            f"vision.extra_levels: level {index} is not an earlier level of {type(trunk).__name__}, whose levels "
            f"are 0..{len(info) - 1} (strides {[f['reduction'] for f in info]}); the last is the tokens' own"
        )
    return int(info[index]["num_chs"])


def _build_timm(cfg: VisionConfig) -> TimmEncoder:
    import timm

    trunk = timm.create_model(cfg.name, pretrained=False, num_classes=0)
    if cfg.checkpoint:
        _load_checkpoint_strict(trunk, cfg.checkpoint)
    pretrained_cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return TimmEncoder(
        trunk,
        block_tokens=cfg.drop_last_block and _has_prefix_tokens(trunk),
        drop_last_block=cfg.drop_last_block,
        mean=pretrained_cfg.get("mean", IMAGENET_MEAN),
        std=pretrained_cfg.get("std", IMAGENET_STD),
        precision=cfg.precision,
        extra_levels=cfg.extra_levels,
        extra_levels_pool=cfg.extra_levels_pool,
    )


# --- open_clip towers ---


class OpenCLIPViTEncoder(FrozenVisionEncoder):
    """open_clip's native `VisionTransformer`: the output block's tokens (cls included, no `ln_post`)."""

    def __init__(
        self, visual: nn.Module, drop_last_block: bool, mean: Sequence[float], std: Sequence[float], precision: str
    ) -> None:
        _prune_to_output_block(visual, len(visual.transformer.resblocks), drop_last_block)
        super().__init__(visual, visual.conv1.out_channels, mean, std, precision)

    def _tokens(self, images: Tensor) -> Tensor:
        visual = self.trunk
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.view(1, 1, -1).expand(len(x), -1, -1).to(x.dtype)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
        batch_first = visual.transformer.batch_first
        x = x if batch_first else x.transpose(0, 1)
        for block in visual.transformer.resblocks:
            x = block(x)
        return x if batch_first else x.transpose(0, 1)

    def num_tokens(self, image_size: int) -> int:
        patch_h, patch_w = self.trunk.patch_size
        return (image_size // patch_h) * (image_size // patch_w) + 1


def _build_open_clip(cfg: VisionConfig) -> FrozenVisionEncoder:
    import open_clip
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        # open_clip would treat a non-file as a pretrained tag and try to download it.
        raise MissingFileError(f"vision.checkpoint={cfg.checkpoint} not found: open_clip needs a local weights file")
    model = open_clip.create_model(
        cfg.name,
        pretrained=cfg.checkpoint,
        pretrained_text=False,
        force_image_size=cfg.image_size,
        device=torch.get_default_device(),  # open_clip moves the model there; this keeps `torch.device("meta")`
    )
    visual = model.visual
    del model  # keep only the image tower: the text tower is freed
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        return TimmEncoder(
            trunk,
            block_tokens=_has_prefix_tokens(trunk),
            drop_last_block=cfg.drop_last_block,
            mean=mean,
            std=std,
            precision=cfg.precision,
        )
    if isinstance(visual, VisionTransformer):
        return OpenCLIPViTEncoder(visual, cfg.drop_last_block, mean, std, cfg.precision)
    raise ConfigError(
        f"open_clip model '{cfg.name}' has a {type(visual).__name__} image tower; "
        "supported: VisionTransformer and timm-backed towers (e.g. EVA01-g-14)"
    )


_BUILDERS = {"vit": ViTEncoder, "timm": _build_timm, "open_clip": _build_open_clip}


def build_vision_encoder(cfg: VisionConfig) -> FrozenVisionEncoder:
    """The frozen encoder for `cfg.kind` ("vit", "timm" or "open_clip")."""
    if cfg.kind not in _BUILDERS:
        raise ConfigError(f"unknown vision.kind '{cfg.kind}': expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[cfg.kind](cfg)


def vision_width(cfg: VisionConfig) -> int:
    """Token width C of `cfg`'s encoder; other kinds than "vit" are built on the meta device (no memory)."""
    if cfg.kind == "vit":
        return cfg.width
    with torch.device("meta"):
        return build_vision_encoder(dataclasses.replace(cfg, checkpoint=None)).width


__all__ = [
    "FrozenVisionEncoder",
    "ViTEncoder",
    "TimmEncoder",
    "OpenCLIPViTEncoder",
    "EvaViT",
    "build_vision_encoder",
    "vision_width",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
