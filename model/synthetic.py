"""`synthetic`: a built-in ten-class dataset of shapes and patterns, generated on the fly.

Image i of seed s is a pure function of (s, i): no files, no download, same pixels on every
machine. Random colours, scale, position, rotation, background clutter and noise make it
useless to a linear model on pixels, while AlexNet learns it in a few CPU minutes.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

LABELS: Final = (
    "circle",
    "triangle",
    "square",
    "star",
    "cross",
    "ring",
    "crescent",
    "stripes",
    "checkerboard",
    "dots",
)
DEFAULT_SIZE: Final = 6000  # images in `synthetic` (train + val)


def _polygon(n: int, r: float, c: float, phase: float = 0.0) -> list[tuple[float, float]]:
    return [
        (
            c + r * math.cos(phase + 2 * math.pi * k / n),
            c + r * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _shape_mask(label: int, side: int, rng: np.random.Generator) -> Image.Image:
    """A white-on-black mask of shape `label` filling a (side, side) box, unrotated."""
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    c, r = side / 2, side / 2 - 1
    name = LABELS[label]
    if name == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif name == "triangle":
        d.polygon(_polygon(3, r, c, -math.pi / 2), fill=255)
    elif name == "square":
        s = r * 0.8
        d.rectangle([c - s, c - s, c + s, c + s], fill=255)
    elif name == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((c + rad * math.cos(a), c + rad * math.sin(a)))
        d.polygon(pts, fill=255)
    elif name == "cross":
        w = r * 0.3
        d.rectangle([c - w, c - r, c + w, c + r], fill=255)
        d.rectangle([c - r, c - w, c + r, c + w], fill=255)
    elif name == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        ri = r * float(rng.uniform(0.45, 0.65))
        d.ellipse([c - ri, c - ri, c + ri, c + ri], fill=0)
    elif name == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        off = r * float(rng.uniform(0.45, 0.7))
        d.ellipse([c - r + off, c - r, c + r + off, c + r], fill=0)
    elif name == "stripes":
        n = int(rng.integers(3, 6))
        band = 2 * r / (2 * n - 1)
        for k in range(n):
            x0 = c - r + 2 * k * band
            d.rectangle([x0, c - r, x0 + band, c + r], fill=255)
    elif name == "checkerboard":
        n = int(rng.integers(3, 5))
        cell = 2 * r / n
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    x0, y0 = c - r + i * cell, c - r + j * cell
                    d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=255)
    else:  # dots
        n = 3
        cell = 2 * r / n
        dr = cell * float(rng.uniform(0.25, 0.38))
        for i in range(n):
            for j in range(n):
                x, y = c - r + (i + 0.5) * cell, c - r + (j + 0.5) * cell
                d.ellipse([x - dr, y - dr, x + dr, y + dr], fill=255)
    return m


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return (r, g, b)


def _contrasting(rng: np.random.Generator, bg: tuple[int, int, int]) -> tuple[int, int, int]:
    for _ in range(20):
        fg = _colour(rng)
        if sum(abs(a - b) for a, b in zip(fg, bg, strict=True)) > 180:
            return fg
    return (255 - bg[0], 255 - bg[1], 255 - bg[2])


def render(seed: int, index: int, size: int) -> tuple[np.ndarray, int]:
    """Image `index` of `seed`: (uint8 array (size, size, 3), label)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(LABELS)
    bg = _colour(rng)
    # Background: a colour ramp in a random direction.
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gx, gy = np.meshgrid(ramp, ramp)
    a = rng.uniform(0, 2 * math.pi)
    grad = (gx * math.cos(a) + gy * math.sin(a))[..., None] * rng.uniform(10, 40)
    img = Image.fromarray(np.clip(np.array(bg, np.float32) + grad, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    # Clutter: thin lines and small blobs that belong to no class.
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        if rng.random() < 0.5:
            d.line([x0, y0, x1, y1], fill=_colour(rng), width=int(rng.integers(1, 3)))
        else:
            rr = float(rng.uniform(1, size * 0.06))
            d.ellipse([x0 - rr, y0 - rr, x0 + rr, y0 + rr], fill=_colour(rng))
    # The object: random scale, rotation and position, mostly inside the frame.
    side = max(8, int(size * rng.uniform(0.55, 0.85)))
    mask = _shape_mask(label, side, rng).rotate(
        float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR, expand=True
    )
    mw, mh = mask.size
    x = int(rng.integers(-mw // 8, max(1, size - mw + mw // 8)))
    y = int(rng.integers(-mh // 8, max(1, size - mh + mh // 8)))
    img.paste(Image.new("RGB", mask.size, _contrasting(rng, bg)), (x, y), mask)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, rng.uniform(2, 8), arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8), label


class SyntheticShapes(Dataset[tuple[torch.Tensor, int]]):
    """`length` images of `size` x `size` pixels; item -> (uint8 (3, size, size), label)."""

    labels = list(LABELS)

    def __init__(self, length: int, size: int, seed: int = 0) -> None:
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        arr, label = render(self.seed, index, self.size)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label
