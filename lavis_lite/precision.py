"""Devices and precision: which device `auto` is, where bf16 is native, and what `auto` means for training
and for frozen weights.

Devices (`device`, `--device`): auto (CUDA where there is one, else the CPU) | cpu | cuda.

Training (`train.precision`, autocast): auto | fp32 (also written `no`, accelerate's name) | bf16 | fp16.
Frozen weights (`llm.precision`, `vision.precision`, feature extraction's dtype): auto | fp32 | bf16 | fp16.
Everywhere `auto` means bf16 where the device runs it natively (CUDA GPUs that support it, CPUs with
AVX512-BF16 or AMX), else fp16 on CUDA and fp32 on CPU.
"""

from __future__ import annotations

import functools
import time

import torch

from lavis_lite.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# train.precision -> accelerate's mixed_precision
_AUTOCAST = {"fp32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}


@functools.cache
def _cpu_bf16_is_native() -> bool:
    """Whether the CPU has AVX512-BF16 or AMX (bf16 matmul about 4x fp32; without them torch emulates bf16 about
    100x slower). Read from the CPU's feature flags where torch reports them, so that a loaded machine cannot
    flip the answer; elsewhere (other architectures) a short matmul timing decides."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    if checks:
        return any(check() for check in checks)

    def rate(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        a @ a
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        return 1 / (time.perf_counter() - start)

    return rate(torch.bfloat16) > 1.5 * rate(torch.float32)


def resolve_device(device: str | None = "auto") -> str:
    """`auto` (or None) -> cuda where available, else cpu; ConfigError for an unknown device or a missing GPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available: use cpu (--device cpu, or device=cpu in a config)")
    return device


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_bf16_is_native()


def resolve_dtype(precision: str, device: torch.device | str = "cpu", key: str = "precision") -> torch.dtype:
    """The dtype of frozen weights for `precision` on `device` (`key` names the setting in errors)."""
    if precision in DTYPES:
        return DTYPES[precision]
    if precision != "auto":
        raise ConfigError(f"{key}='{precision}' is not one of auto, {', '.join(DTYPES)}")
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def resolve_autocast(precision: str) -> str:
    """accelerate's `mixed_precision` ("no", "bf16", "fp16") for `train.precision` on this machine."""
    if precision == "auto":
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}[resolve_dtype("auto", resolve_device())]
    if precision not in _AUTOCAST:
        raise ConfigError(f"train.precision='{precision}' is not one of auto, fp32 (or no), bf16, fp16")
    return _AUTOCAST[precision]

