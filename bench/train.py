"""Training throughput: our engine vs a seed-style loop, same model, data and batch size.

Data: 32x32 images (CIFAR-10's size; the built-in shapes rendered at 32x32, since CIFAR-10
cannot be downloaded everywhere), 10 classes, AlexNet (torchvision layout) at 224x224,
batch 128, SGD(lr 0.01, momentum 0.9, weight decay 5e-4).

- seed-style: the article's recipe - per-image PIL Resize((224, 224)) + ToTensor +
  Normalize on the CPU in the DataLoader, fp32, contiguous tensors, default SGD.
- ours: `model.trainer.Trainer` as `alexnet train` runs it - uint8 batches resized on the
  device, bf16 autocast (on CPUs with AVX-512-BF16/AMX), channels_last, fused SGD.

    python bench/train.py [--steps 5] [--image-size 224] [--variants]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, table
from model import trainer as trainer_mod
from model.config import TrainConfig
from model.data import DatasetBundle, TensorImages
from model.network import build_model
from model.run import Event, Start, Step
from model.synthetic import LABELS, render
from model.transforms import Preprocessing


def small_images(n: int) -> tuple[torch.Tensor, list[int]]:
    arrs = [render(0, i, 32) for i in range(n)]
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a, _ in arrs])
    return x, [label for _, label in arrs]


class PilImages(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, x: torch.Tensor, y: list[int], tf: Any) -> None:
        self.imgs = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
        self.y, self.tf = y, tf

    def __len__(self) -> int:
        return len(self.imgs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tf(self.imgs[i]), self.y[i]


def seed_style(x: torch.Tensor, y: list[int], size: int, bs: int, steps: int) -> float:
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])  # fmt: skip
    loader = DataLoader(PilImages(x, y, tf), batch_size=bs, shuffle=True)
    torch.manual_seed(0)
    model = build_model("alexnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    t_first = 0.0
    for step, (images, labels) in enumerate(loader):
        opt.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        loss.item()
        if step == 0:
            t_first = time.perf_counter()  # step 1 is warm-up
        if step + 1 == steps:
            break
    return (steps - 1) * bs / (time.perf_counter() - t_first)


def _variant(name: str) -> None:
    """Patch the trainer's network for one measured variant (the engine itself is as is)."""
    build = trainer_mod.Trainer._build
    if name == "compile":

        def compiled(self: Any, *a: Any, **k: Any) -> Any:
            clf, info = build(self, *a, **k)
            # the forward only: the state_dict (saved weights) keeps its keys
            clf.net.forward = torch.compile(clf.net.forward)
            return clf, info

        trainer_mod.Trainer._build = compiled  # type: ignore[method-assign]
    elif name == "contiguous":

        def contiguous(self: Any, *a: Any, **k: Any) -> Any:
            clf, info = build(self, *a, **k)
            clf.net = clf.net.to(memory_format=torch.contiguous_format)
            clf.channels_last = False
            return clf, info

        trainer_mod.Trainer._build = contiguous  # type: ignore[method-assign]


def ours(x: torch.Tensor, y: list[int], size: int, bs: int, steps: int,
         variant: str = "") -> tuple[float, str]:  # fmt: skip
    original = trainer_mod.Trainer._build
    _variant(variant)
    try:
        return _ours(x, y, size, bs, steps)
    finally:
        trainer_mod.Trainer._build = original  # type: ignore[method-assign]


def _ours(x: torch.Tensor, y: list[int], size: int, bs: int, steps: int) -> tuple[float, str]:
    n_train = bs * steps
    pre = Preprocessing.for_size(size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    full = TensorImages(x, y)
    bundle = DatasetBundle(spec="cifar10-like", labels=list(LABELS), pre=pre,
                           train=Subset(full, list(range(n_train))),
                           val=Subset(full, list(range(n_train, len(full)))),
                           split={"n": len(full)})  # fmt: skip
    trainer_mod.load_dataset = lambda *a, **k: bundle  # type: ignore[assignment]
    times: list[float] = []
    info: dict[str, Any] = {}

    def on_event(ev: Event) -> None:
        if isinstance(ev, Step):
            times.append(time.perf_counter())
        if isinstance(ev, Start):
            info.update(ev.device)

    trainer_mod.EVENT_INTERVAL_S = 0.0
    cfg = TrainConfig(dataset="synthetic", image_size=size, batch_size=bs, epochs=1, workers=0,
                      augment=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer_mod.Trainer(cfg, data_dir=Path(tmp), models_dir=Path(tmp) / "m",
                            run_dir=Path(tmp) / "r", callback=on_event).fit()  # fmt: skip
    return (len(times) - 1) * bs / (times[-1] - times[0]), f"{info['device']} {info['precision']}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--variants", action="store_true",
                    help="also: ours with torch.compile of the network, ours without channels_last")  # fmt: skip
    a = ap.parse_args()
    x, y = small_images(a.batch_size * a.steps + 64)
    base = seed_style(x, y, a.image_size, a.batch_size, a.steps)
    fast, where = ours(x, y, a.image_size, a.batch_size, a.steps)
    extra = []
    if a.variants:
        for variant, label in (("compile", "ours + torch.compile of the network's forward"),
                               ("contiguous", "ours without channels_last")):  # fmt: skip
            rate, _ = ours(x, y, a.image_size, a.batch_size, a.steps, variant)
            extra.append([label, where, f"{rate:.1f}", f"{rate / base:.2f}x"])
    print(f"Machine: {machine()}\nAlexNet 10 classes at {a.image_size}x{a.image_size} from 32x32 "
          f"images, batch {a.batch_size}, {a.steps - 1} timed steps after one warm-up\n")  # fmt: skip
    print(table(["loop", "precision", "train images/s", "ratio"], [
        ["seed-style (per-image PIL resize, fp32, contiguous)", "cpu fp32", f"{base:.1f}", "1.00x"],
        ["ours (batched device resize, channels_last, fused SGD)", where, f"{fast:.1f}",
         f"{fast / base:.2f}x"], *extra]))  # fmt: skip


if __name__ == "__main__":
    main()
