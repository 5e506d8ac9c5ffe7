"""How well calibrated the answers are, before and after temperature scaling: ECE (15
bins) and NLL on each dataset's frozen holdout, for the built-in model and for a
fine-tune on a dataset imported like an upload.

1. built-in: the embedded default's recipe (app/bootstrap.py: synthetic, 128 px, 4 epochs,
   cosine, no dropout) on `--images` of the built-in shapes;
2. patterns4: four of the shapes at another seed (`--per-class` images each, JPEG and PNG
   files, imported with its 15% holdout), fine-tuned from (1) with `--freeze all-but-head`.

Each version is written by the training engine itself (model/trainer.py), which fits the
temperature on the validation split and measures it on the holdout (model/extras.py); this
script reads what model.json says and copies the reliability diagrams to `--out`.

    python bench/calibration.py [--images 6000] [--per-class 150] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, table
from bench.fine_tune import TARGET_CLASSES, write_shapes
from model.checkpoint import RELIABILITY_FILE, ModelCard
from model.config import TrainConfig
from model.datasets import DatasetStore
from model.trainer import Trainer


def fit(home: Path, run: str, cfg: dict[str, object]) -> tuple[ModelCard, float]:
    t0 = time.perf_counter()
    result = Trainer(TrainConfig(**cfg), data_dir=home / "data", models_dir=home / "models",
                     run_dir=home / "runs" / run).fit()  # fmt: skip
    return result.card, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6000, help="built-in images (train + val)")
    ap.add_argument("--per-class", type=int, default=150, help="patterns4 images per class")
    ap.add_argument("--out", type=Path, help="where to copy the reliability diagrams")
    args = ap.parse_args()
    common = {"image_size": 128, "batch_size": 32, "dropout": 0.0, "scheduler": "cosine",
              "device": "cpu", "workers": 1}  # fmt: skip
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        write_shapes(home / "src", TARGET_CLASSES, args.per_class, seed=77)
        DatasetStore(home / "data").import_folder(home / "src", "patterns4")
        builtin, s1 = fit(home, "builtin", {**common, "dataset": f"synthetic:{args.images}",
                                            "epochs": 4})  # fmt: skip
        tuned, s2 = fit(home, "patterns4", {**common, "dataset": "imagefolder:patterns4",
                                            "epochs": 6, "base": builtin.version,
                                            "freeze": "all-but-head", "augment": True})  # fmt: skip
        rows = []
        for name, card, secs in (("built-in (synthetic)", builtin, s1),
                                 ("patterns4 (fine-tune, all-but-head)", tuned, s2)):  # fmt: skip
            c = card.calibration or {}
            rows.append([name, f"{card.metrics['val_top1']:.1%}", c.get("n"),
                         f"{c.get('temperature', 1):.3f}", f"{100 * c['ece_before']:.2f}%",
                         f"{100 * c['ece_after']:.2f}%", f"{c['nll_before']:.4f}",
                         f"{c['nll_after']:.4f}", f"{secs:.0f}"])  # fmt: skip
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                dst = args.out / f"reliability-{name.split()[0]}.png"
                shutil.copy(home / "models" / card.version / RELIABILITY_FILE, dst)
                print(f"  {dst}")
        print()
        print(table(["dataset", "val top-1", "holdout images", "temperature", "ECE before",
                     "ECE after", "NLL before", "NLL after", "train s"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
