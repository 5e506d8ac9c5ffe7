"""AlexNet in two layouts: torchvision's single-tower network and the 2012 paper's.

Both are size-agnostic (an adaptive pool feeds the classifier), so any input of at least
63x63 pixels works. `build_model()` is the one constructor used by training, checkpoint
loading and the torchvision importer.
"""

from __future__ import annotations

from typing import Final, Literal

import torch
from torch import nn

Arch = Literal["alexnet", "alexnet-paper"]
Init = Literal["default", "paper"]
ARCHS: Final[tuple[str, ...]] = ("alexnet", "alexnet-paper")
INITS: Final[tuple[str, ...]] = ("default", "paper")
MIN_INPUT_SIZE: Final = 63  # smallest side for which every pooling stage has output


class AlexNet(nn.Module):
    """torchvision's layout (64/192/384/256/256). Parameter names match
    `torchvision.models.alexnet`, so its ImageNet state dict loads as is."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # conv1
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # conv2
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # conv3
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # conv5
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),  # fc8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 256, h, w)
        x = self.avgpool(x)  # (B, 256, 6, 6)
        x = torch.flatten(x, 1)  # (B, 9216)
        out: torch.Tensor = self.classifier(x)  # (B, num_classes)
        return out


def paper_lrn() -> nn.LocalResponseNorm:
    """The paper's LRN: b = a / (k + alpha * sum_{n neighbours} a^2)^beta with k=2, n=5,
    alpha=1e-4, beta=0.75. nn.LocalResponseNorm divides alpha by n, so pass n * alpha."""
    n, alpha = 5, 1e-4
    return nn.LocalResponseNorm(size=n, alpha=n * alpha, beta=0.75, k=2.0)


class AlexNetPaper(nn.Module):
    """The 2012 paper's layout (96/256/384/384/256 kernels). The two-GPU split becomes
    grouped convolutions: conv2, conv4 and conv5 see only their own half of the maps;
    conv3 and the fully connected layers see everything. 60,965,224 parameters at 1000
    classes."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2),  # conv1
            nn.ReLU(inplace=True),
            paper_lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # overlapping pooling
            nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),  # conv2
            nn.ReLU(inplace=True),
            paper_lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # conv3
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),  # conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),  # conv5
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),  # dropout on fc6's output
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),  # dropout on fc7's output
            nn.Linear(4096, num_classes),  # fc8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        out: torch.Tensor = self.classifier(x)
        return out


def init_weights(net: nn.Module, scheme: str = "default") -> None:
    """Initialise `net` in place.

    - "default": Kaiming-normal convolutions (fan_out, ReLU), N(0, 0.01) linear layers,
      zero biases. Trains reliably from scratch with SGD at lr 0.01 on both layouts.
    - "paper": the paper's section 5: every weight N(0, 0.01); biases 1 in conv2, conv4,
      conv5 and the hidden fully connected layers (fc6, fc7), 0 elsewhere. Faithful, but
      slow to get going without the paper's 90 epochs.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; expected one of {', '.join(INITS)}")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for i, conv in enumerate(convs):
        assert conv.bias is not None
        if scheme == "paper":
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.constant_(conv.bias, 1.0 if i in (1, 3, 4) else 0.0)
        else:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    for i, fc in enumerate(linears):
        nn.init.normal_(fc.weight, 0.0, 0.01)
        hidden = i < len(linears) - 1
        nn.init.constant_(fc.bias, 1.0 if scheme == "paper" and hidden else 0.0)


def build_model(
    arch: str, *, num_classes: int, init: str | None = "default", dropout: float = 0.5
) -> nn.Module:
    """Build an AlexNet by name. `init=None` skips initialisation (weights about to be
    loaded from a checkpoint)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    net: nn.Module
    if arch == "alexnet":
        net = AlexNet(num_classes=num_classes, dropout=dropout)
    elif arch == "alexnet-paper":
        net = AlexNetPaper(num_classes=num_classes, dropout=dropout)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if init is not None:
        init_weights(net, init)
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
