"""Training from scratch vs fine-tuning from a base, with each `freeze` mode, on one small
dataset: holdout top-1 and wall time, on this machine's CPU.

The base is trained here first (offline: no ImageNet weights) on six of the built-in shapes
(circle, triangle, square, star, cross, ring); the small dataset is the other four
(crescent, stripes, checkerboard, dots), `--per-class` images each, written as JPEG and PNG
files and imported like an upload (model/datasets.py: 15% of each class frozen as its
holdout). Every run trains the same epochs through the same engine as `alexnet train`
(model/trainer.py) and is judged on that holdout through the one prediction path.

    python bench/fine_tune.py [--per-class 60] [--epochs 6] [--image-size 128]
                              [--base-per-class 500] [--base-epochs 6]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

from bench.common import machine, table
from model.checkpoint import load_version
from model.config import TrainConfig
from model.datasets import DatasetStore
from model.device import resolve
from model.evaluation import evaluate_version
from model.synthetic import LABELS, render
from model.trainer import Trainer

BASE_CLASSES = LABELS[:6]
TARGET_CLASSES = LABELS[6:]


def write_shapes(folder: Path, classes: tuple[str, ...], per_class: int, seed: int) -> None:
    for name in classes:
        c = LABELS.index(name)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr, _ = render(seed, c + k * len(LABELS), 160)
            buf = io.BytesIO()
            fmt, ext = ("JPEG", "jpg") if k % 2 else ("PNG", "png")
            Image.fromarray(arr).save(buf, format=fmt, quality=90)
            (folder / name / f"{k:04d}.{ext}").write_bytes(buf.getvalue())


def fit(home: Path, run: str, cfg: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    t0 = time.perf_counter()
    result = Trainer(TrainConfig(**cfg), data_dir=home / "data", models_dir=home / "models",
                     run_dir=home / "runs" / run).fit()  # fmt: skip
    return result.card.version, time.perf_counter() - t0, result.history[-1]


def holdout_top1(home: Path, version: str, dataset: str) -> tuple[float, int]:
    net, card = load_version(home / "models" / version)
    rep = evaluate_version(net, card, dataset, split="holdout", data_dir=home / "data",
                           placement=resolve("cpu", "auto"), channels_last=True)  # fmt: skip
    return rep.result.top1, rep.result.count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--per-class", type=int, default=60, help="images per class of the small dataset"
    )
    ap.add_argument("--base-per-class", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--base-epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args()
    common = {"image_size": args.image_size, "batch_size": 32, "dropout": 0.0,
              "scheduler": "cosine", "device": "cpu", "workers": 1, "augment": True}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = DatasetStore(home / "data")
        write_shapes(home / "src-base", BASE_CLASSES, args.base_per_class, seed=21)
        write_shapes(home / "src-small", TARGET_CLASSES, args.per_class, seed=42)
        store.import_folder(home / "src-base", "shapes6")
        small = store.import_folder(home / "src-small", "patterns4")
        print(f"machine: {machine()}")
        print(
            f"small dataset: {len(small.classes)} classes x {args.per_class} images, "
            f"{small.split_totals()}; base: {len(BASE_CLASSES)} other classes x "
            f"{args.base_per_class} images; {args.epochs} epochs at {args.image_size} px"
        )
        # the built-in recipe for shapes (README: Training): no augmentation, lr 0.01
        base, base_s, base_last = fit(home, "base", {**common, "dataset": "imagefolder:shapes6",
                                                     "epochs": args.base_epochs, "lr": 0.01,
                                                     "augment": False})  # fmt: skip
        print(f"base {base}: {base_s:.0f} s, val top-1 {base_last['val_top1']:.1%}")
        runs = [
            ("from scratch", {"lr": 0.02}),
            ("fine-tune, freeze none", {"base": base, "lr": 0.01, "base_lr_scale": 0.5}),
            ("fine-tune, freeze features", {"base": base, "freeze": "features", "lr": 0.01}),
            (
                "fine-tune, freeze all-but-head",
                {"base": base, "freeze": "all-but-head", "lr": 0.01},
            ),
        ]
        rows = []
        for name, extra in runs:
            version, secs, last = fit(home, name.replace(" ", "-").replace(",", ""),
                                      {**common, "dataset": "imagefolder:patterns4",
                                       "epochs": args.epochs, **extra})  # fmt: skip
            top1, n = holdout_top1(home, version, "imagefolder:patterns4")
            rows.append([name, f"{top1:.1%}", n, f"{last['val_top1']:.1%}", f"{secs:.0f}",
                         f"{last['images_per_s']:.0f}"])  # fmt: skip
            print(f"  {name}: holdout {top1:.1%}, {secs:.0f} s", flush=True)
        print()
        print(table(["run", "holdout top-1", "holdout images", "last val top-1", "wall s",
                     "train img/s"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
