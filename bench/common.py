"""Helpers shared by the benchmarks: real photos, tables, machine description."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from model.device import cpu_info
from tests.helpers.photos import photo_paths


def jpeg_photos(folder: Path, size: tuple[int, int] | None = (1024, 768)) -> list[Path]:
    """The photos as JPEG files of a typical upload size (quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in photo_paths():
        img = Image.open(src).convert("RGB")
        if size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        dst = folder / f"{src.stem}.jpg"
        img.save(dst, quality=90)
        out.append(dst)
    return out


def machine() -> str:
    cpu, flags = cpu_info()
    amx = "AMX" if "amx_bf16" in flags else "no AMX"
    return (f"{cpu} ({amx}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, sep, *body])
