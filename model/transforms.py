"""Preprocessing: from an RGB uint8 tensor to the network's input, described by metadata
stored with every checkpoint.

`EvalTransform` is the one path for validation, the CLI and the service. It works on one
image (3, H, W) or a batch of same-sized images (B, 3, H, W), on any device, so small
datasets are resized in batches on the accelerator with exactly the same operations.
Normalisation (mean/std) happens inside the model wrapper, in the model's precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

RESIZE_POLICIES: Final = ("center_crop", "stretch")
IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
CROP_RATIO: Final = 224 / 256  # torchvision's resize-256-crop-224 ratio


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes network input.

    center_crop: resize the shorter side to `resize_size`, then centre-crop `image_size`.
    stretch: resize both sides to `image_size` (aspect ratio not kept).
    """

    image_size: int
    resize_size: int
    resize: str = "center_crop"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(
                f"unknown resize policy {self.resize!r}; expected one of "
                f"{', '.join(RESIZE_POLICIES)}"
            )
        if self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size {self.resize_size} is smaller than image_size {self.image_size}"
            )

    @classmethod
    def for_size(cls, image_size: int, **kw: Any) -> Preprocessing:
        """The torchvision recipe scaled to `image_size` (224 -> resize 256, crop 224)."""
        return cls(image_size=image_size, resize_size=round(image_size / CROP_RATIO), **kw)

    @property
    def min_side(self) -> int:
        """The smallest input side that needs no upsampling (a hint for JPEG draft)."""
        return self.resize_size if self.resize == "center_crop" else self.image_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EvalTransform:
    """uint8 (..., 3, H, W) -> uint8 (..., 3, S, S): resize (antialiased bilinear), crop."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pre = self.pre
        if pre.resize == "center_crop":
            image = _bound_aspect(image)
        size = [pre.image_size, pre.image_size] if pre.resize == "stretch" else [pre.resize_size]
        out: torch.Tensor = F.resize(
            image, size, interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        if pre.resize == "center_crop":
            out = F.center_crop(out, [pre.image_size, pre.image_size])
        return out


MAX_ASPECT: Final = 3  # longer side / shorter side kept before resizing (center_crop)


def _bound_aspect(image: torch.Tensor) -> torch.Tensor:
    """Centre-crop the longer side to at most MAX_ASPECT x the shorter one.

    Resizing the shorter side up first would make a 20000x1 image (a 143-byte PNG)
    5,120,000 x 256 pixels: gigabytes and seconds, for a crop that keeps only the centre.
    The final centre crop covers at most 1.0 x the shorter side, so cutting the longer
    side to 3x of it keeps everything the output sees, with a margin for the resampling
    filter; images with ordinary aspect ratios are not touched at all.
    """
    h, w = image.shape[-2:]
    if w > MAX_ASPECT * h:
        w = MAX_ASPECT * h
    elif h > MAX_ASPECT * w:
        h = MAX_ASPECT * w
    else:
        return image
    out: torch.Tensor = F.center_crop(image, [h, w])
    return out


def eval_transform(pre: Preprocessing) -> EvalTransform:
    return EvalTransform(pre)


class Normalize(torch.nn.Module):
    """uint8 or [0, 1] float batch -> standardised float batch, in `dtype`."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        # (1, 3, 1, 1) so it broadcasts over (B, 3, H, W); buffers follow .to(device).
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        out: torch.Tensor = (x - self.mean) / self.std
        return out
