"""Inference speed of each precision / layout / compilation on this machine, and top-1
agreement with fp32 on real-looking images (11 photos x 20 random crops and flips).

    python bench/precision.py [--weights-file alexnet-owt-7be5be79.pth]

Without torchvision's ImageNet weights (offline) the 1000-class model has random weights
with fc8 scaled x20 so that its softmax is as peaked as a trained model's; pass the real
file where you have it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, photo_paths, table
from model.device import Placement
from model.engine import for_inference, predict
from model.images import read_image_file
from model.network import build_model
from model.pretrained import IMAGENET_PRE, load_torchvision_state
from model.transforms import EvalTransform


def probe_images(n_variants: int = 20) -> torch.Tensor:
    """Photos, each with random resized crops and flips, through the eval transform."""
    g = torch.Generator().manual_seed(0)
    tf = EvalTransform(IMAGENET_PRE)
    out = []
    for p in photo_paths():
        img = read_image_file(p)
        _, h, w = img.shape
        for _ in range(n_variants):
            s = float(torch.empty(1).uniform_(0.35, 1.0, generator=g))
            ch, cw = max(64, int(h * s)), max(64, int(w * s))
            y = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            x = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            crop = img[:, y : y + ch, x : x + cw]
            if torch.rand(1, generator=g) < 0.5:
                crop = crop.flip(-1)
            out.append(tf(crop))
    return torch.stack(out)


def speed(model: torch.nn.Module, bs: int, seconds: float = 3.0) -> float:
    x = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8)
    for _ in range(2):
        predict(model, x, 5)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predict(model, x, 5)
        n += bs
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights-file", type=Path)
    args = ap.parse_args()
    if args.weights_file:
        state = load_torchvision_state(args.weights_file)
        source = "torchvision ImageNet weights"
    else:
        torch.manual_seed(0)
        net = build_model("alexnet", num_classes=1000)
        with torch.no_grad():
            net.classifier[6].weight.mul_(20)
        state = net.state_dict()
        source = "random weights, fc8 x20 (offline stand-in)"

    def fresh() -> torch.nn.Module:
        n = build_model("alexnet", num_classes=1000, init=None)
        n.load_state_dict(state)
        return n

    probes = probe_images()
    cpu = torch.device("cpu")
    variants = [
        ("fp32, contiguous", "fp32", False, False),
        ("fp32, channels_last", "fp32", True, False),
        ("bf16 weights, channels_last (default)", "bf16", True, False),
        ("bf16 weights, contiguous", "bf16", False, False),
        ("bf16 weights, channels_last, torch.compile", "bf16", True, True),
    ]
    ref = predict(for_inference(fresh(), IMAGENET_PRE, Placement(cpu, "fp32")), probes, 1).indices[
        :, 0
    ]
    rows = []
    for name, prec, cl, comp in variants:
        model = for_inference(fresh(), IMAGENET_PRE, Placement(cpu, prec), channels_last=cl)
        if comp:
            model.net = torch.compile(model.net, dynamic=False)  # type: ignore[assignment]
        top1 = predict(model, probes, 1).indices[:, 0]
        agree = float((top1 == ref).float().mean())
        rows.append([name, f"{speed(model, 1):.0f}", f"{speed(model, 8):.0f}", f"{speed(model, 32):.0f}",
                     f"{agree:.1%}"])  # fmt: skip
    # bf16 autocast over fp32 weights, for comparison (what training uses)
    model = for_inference(fresh(), IMAGENET_PRE, Placement(cpu, "fp32"))
    auto = torch.bfloat16

    def sp(bs: int) -> float:
        x = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8)
        for _ in range(2):
            predict(model, x, 5, autocast_dtype=auto)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3:
            predict(model, x, 5, autocast_dtype=auto)
            n += bs
        return n / (time.perf_counter() - t0)

    top1 = predict(model, probes, 1, autocast_dtype=auto).indices[:, 0]
    rows.append(["bf16 autocast over fp32 weights", f"{sp(1):.0f}", f"{sp(8):.0f}", f"{sp(32):.0f}",
                 f"{float((top1 == ref).float().mean()):.1%}"])  # fmt: skip
    print(f"Machine: {machine()}\nModel: AlexNet 1000 classes at 224x224, {source}\n"
          f"Agreement: top-1 vs fp32 on {len(probes)} photo crops\n")  # fmt: skip
    print(table(["variant", "img/s b=1", "img/s b=8", "img/s b=32", "top-1 agreement"], rows))


if __name__ == "__main__":
    main()
