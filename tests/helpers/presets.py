"""torchvision's own preprocessing, to compare ours against."""

from __future__ import annotations

import torch
from torchvision.models import AlexNet_Weights
from torchvision.transforms import v2


def torchvision_v2_preset() -> v2.Compose:
    """torchvision's own eval preset for the AlexNet weights, in its v2 transforms API."""
    p = AlexNet_Weights.IMAGENET1K_V1.transforms()
    return v2.Compose([
        v2.Resize(p.resize_size, interpolation=p.interpolation, antialias=True),
        v2.CenterCrop(p.crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(p.mean, p.std),
    ])  # fmt: skip
