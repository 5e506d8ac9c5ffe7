"""Small model versions and encoded images, made by the tests themselves."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from model.checkpoint import ModelCard, save_version, write_active
from model.network import build_model
from model.transforms import Preprocessing


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_version(
    models_dir: Path,
    *,
    num_classes: int = 10,
    image_size: int = 64,
    seed: int = 0,
    arch: str = "alexnet",
    activate: bool = False,
    sharpen: float = 20.0,
    labels: list[str] | None = None,
    probes: bool = False,
    bf16_fragile: bool = False,
    int8_fragile: bool = False,
    **kw: object,
) -> ModelCard:
    """A small randomly initialised version; fc8 scaled by `sharpen` so its softmax is
    peaked like a trained model's (top-k ties would make comparisons meaningless).
    `probes`: with parity probes from built-in images, answered the trainer's way."""
    torch.manual_seed(seed)
    num_classes = len(labels) if labels else num_classes
    net = build_model(arch, num_classes=num_classes)
    with torch.no_grad():
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(sharpen)
        if bf16_fragile:
            # Classes 0 and 1 get weights of exactly 64.0 (a bf16 value), class 1's plus
            # 0.2, less than half of bf16's step of 0.5 there: in fp32 class 1 wins by
            # 0.2 x sum(fc7 activations) in logit; with bf16 weights the rows are equal
            # and the two tie. A real precision failure, on every CPU.
            last.weight[0].fill_(64.0)
            last.weight[1].fill_(64.2)
            last.bias[:2].zero_()
        if int8_fragile:
            # Also too close for int8 (per-channel weights, step = the row's max / 127):
            # both rows get one weight of 200.0, so their step is 200 / 127 = 1.57 and
            # 64.0 and 64.2 both round to 41 steps: the int8 rows are equal, the logits tie
            # and the top-1 goes to class 0 where fp32 answers class 1. (bf16 ties too:
            # 200 is a bf16 value.)
            last.weight[0].fill_(64.0)
            last.weight[1].fill_(64.2)
            last.weight[:2, 0] = 200.0
            last.bias[:2].zero_()
    pre = Preprocessing.for_size(image_size)
    names = list(labels) if labels else [f"class_{i}" for i in range(num_classes)]
    if probes:
        from model.probes import card_entries, training_probes
        from model.synthetic import SyntheticShapes

        entries, files = card_entries(
            training_probes(net, SyntheticShapes(64, pre.resize_size, seed=11), pre, 1.0), names
        )
        kw = {"probes": entries, "extra_files": files, **kw}
    card = save_version(
        models_dir,
        net,
        arch=arch,
        labels=names,
        pre=pre,
        **kw,  # type: ignore[arg-type]
    )
    if activate:
        write_active(models_dir, card.version)
    return card
