from __future__ import annotations

import pytest
import torch

from model import device as D


def test_auto_device_is_cpu_without_accelerators() -> None:
    if torch.cuda.is_available() or D.mps_available():
        pytest.skip("an accelerator is present")
    assert D.select_device("auto").type == "cpu"


def test_unavailable_or_unknown_devices_are_errors_not_fallbacks() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(D.DeviceError, match="no CUDA device"):
            D.select_device("cuda")
    with pytest.raises(D.DeviceError, match="auto, cpu, cuda, mps"):
        D.select_device("tpu")


def test_auto_precision_on_cpu_follows_the_bf16_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(D, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert D.select_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(D, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert D.select_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(D, "cpu_flags", lambda: frozenset({"avx2"}))
    assert D.select_precision("auto", cpu) == "fp32"
    assert D.select_precision("auto", torch.device("mps")) == "fp32"


def test_explicit_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert D.select_precision("fp32", cpu) == "fp32"
    with pytest.raises(D.DeviceError, match="fp16"):
        D.select_precision("fp16", cpu)
    with pytest.raises(D.DeviceError, match="auto, fp32, bf16, fp16"):
        D.select_precision("int4", cpu)


def test_placement_reports_what_was_chosen() -> None:
    p = D.resolve("cpu", "fp32")
    assert p.describe() == {"device": "cpu", "precision": "fp32"}
    assert p.dtype == torch.float32
