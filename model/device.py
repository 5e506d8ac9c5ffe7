"""Pick the device (CUDA, then Apple MPS, then CPU) and the numeric precision for it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

import torch

log = logging.getLogger(__name__)

DEVICES: Final = ("auto", "cpu", "cuda", "mps")
PRECISIONS: Final = ("auto", "fp32", "bf16", "fp16")
DTYPES: Final = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """The requested device or precision cannot be used on this machine."""


@cache
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU does bf16 matrix work natively (AMX or AVX-512 BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU. An explicit choice that is not available is
    an error, not a silent fallback."""
    if preference not in DEVICES:
        raise DeviceError(f"unknown device {preference!r}; expected one of {', '.join(DEVICES)}")
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested but no CUDA device is available")
    if preference == "mps" and not mps_available():
        raise DeviceError("device 'mps' requested but Apple MPS is not available")
    return torch.device(preference)


def select_precision(preference: str, device: torch.device) -> str:
    """Resolve `auto|fp32|bf16|fp16` for `device`.

    auto: bf16 on CPUs with AMX or AVX-512-BF16 (2-3x faster than fp32 there), bf16 on
    CUDA GPUs that support it else fp16, fp32 elsewhere (MPS included).
    """
    if preference not in PRECISIONS:
        raise DeviceError(
            f"unknown precision {preference!r}; expected one of {', '.join(PRECISIONS)}"
        )
    if preference == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if preference == "fp16" and device.type == "cpu":
        raise DeviceError("precision 'fp16' is not supported on the CPU; use bf16 or fp32")
    if preference == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("bf16 requested on a CPU without native bf16: expect it to be slow")
    return preference


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs; reported by the CLI and GET /v1/models/active."""

    device: torch.device
    precision: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def describe(self) -> dict[str, str]:
        name = str(self.device)
        if self.device.type == "cuda":
            name = f"cuda ({torch.cuda.get_device_name(self.device)})"
        return {"device": name, "precision": self.precision}


def resolve(device: str = "auto", precision: str = "auto") -> Placement:
    dev = select_device(device)
    return Placement(dev, select_precision(precision, dev))
