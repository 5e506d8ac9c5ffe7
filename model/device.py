"""Pick the device (CUDA, then Apple MPS, then CPU) and the numeric precision for it."""

from __future__ import annotations

import importlib.util
import logging
import platform
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Final

import torch

log = logging.getLogger(__name__)

DEVICES: Final = ("auto", "cpu", "cuda", "mps")
PRECISIONS: Final = ("auto", "fp32", "bf16", "fp16", "int8")
# int8 (model/quantize.py) takes and returns float32: the quantized program quantizes inside.
DTYPES: Final = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "int8": torch.float32}  # fmt: skip
INT8_INSTALL: Final = "pip install 'alexnet-service[int8]'"


class DeviceError(ValueError):
    """The requested device or precision cannot be used on this machine."""


@cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (the first core's; "" and
    none where there is no such file, e.g. macOS: the name is then the platform's)."""
    name, flags = "", frozenset[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if not name and line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif not flags and line.startswith("flags"):
            flags = frozenset(line.split(":", 1)[1].split())
        if name and flags:
            break
    return name or platform.processor() or platform.machine(), flags


def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    return cpu_info()[1]


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
    """Resolve `auto|fp32|bf16|fp16|int8` for `device`.

    auto: bf16 on CPUs with AMX or AVX-512-BF16 (2-3x faster than fp32 there), bf16 on
    CUDA GPUs that support it else fp16, fp32 elsewhere (MPS included). (A `Placement`
    resolved from auto may still serve int8 on the CPU: app/registry.py `prepare` does
    where a guard-passing int8 program of the version is cached.)
    int8: CPU only (PT2E + x86 kernels, model/quantize.py), needs torchao.
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
    if preference == "int8":
        if device.type != "cpu":
            raise DeviceError(f"precision 'int8' runs on the CPU only, not {device.type}; "
                              "use bf16 or fp16 there")  # fmt: skip
        if importlib.util.find_spec("torchao") is None:
            raise DeviceError(f"precision 'int8' needs torchao: {INT8_INSTALL}")
        if not {"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags():
            log.warning(
                "int8 requested on a CPU without VNNI or AMX: its first load measures "
                "it against fp32 (precision_check.int8.speedup_vs_fp32)"
            )
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
    # Resolved from `auto`: int8 may replace `precision` at load (see select_precision).
    auto: bool = field(default=False, compare=False)

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
    return Placement(dev, select_precision(precision, dev), auto=precision == "auto")


def eager_placement(placement: Placement) -> Placement:
    """What the CLI's one-off `predict` and `evaluate` run at: int8 is a compiled, cached
    program that only the server's load builds (app/registry.py), so they run fp32."""
    if placement.precision == "int8":
        log.warning("int8 is served by `alexnet serve` only; running fp32 here")
        return Placement(placement.device, "fp32")
    return placement
