"""One precision vocabulary: what auto means for autocast and for frozen weights, and the errors."""

import pytest
import torch

from lavis_lite.config import ConfigError
from lavis_lite.precision import native_bf16, resolve_autocast, resolve_dtype


def test_explicit_precisions():
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_autocast("fp32") == resolve_autocast("no") == "no"
    assert resolve_autocast("bf16") == "bf16" and resolve_autocast("fp16") == "fp16"


def test_auto_is_bf16_exactly_where_it_is_native():
    expected = torch.bfloat16 if native_bf16("cpu") else torch.float32
    assert resolve_dtype("auto", "cpu") is expected
    if not torch.cuda.is_available():
        assert resolve_autocast("auto") == ("bf16" if native_bf16("cpu") else "no")


def test_bad_precisions_name_the_setting():
    with pytest.raises(ConfigError, match="llm.precision='fp8' is not one of auto, fp32, bf16, fp16"):
        resolve_dtype("fp8", key="llm.precision")
    with pytest.raises(ConfigError, match="train.precision='half'"):
        resolve_autocast("half")


def test_one_device_resolver():
    from lavis_lite.precision import resolve_device

    assert resolve_device("auto") == resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_native_bf16_on_cpu_follows_the_cpu_flags_not_the_load(monkeypatch):
    """The CPU's AVX512-BF16 / AMX flags decide, so a busy machine cannot turn `auto` into fp32 for one run."""
    from lavis_lite import precision

    for avx512_bf16, amx, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        precision._cpu_bf16_is_native.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(precision.time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("timed")))
        assert native_bf16("cpu") is expected
    precision._cpu_bf16_is_native.cache_clear()
