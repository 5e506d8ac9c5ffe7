"""The training recipe options, each on its own and all together, against the plain run:
validation top-1 and loss per epoch and wall time, on this machine's CPU.

Every run is `alexnet train`'s engine (model/trainer.py) on the built-in `synthetic`
dataset with the same seed, split, image size, batch size and epochs; only the option
changes: `--warmup-epochs 1`, `--label-smoothing 0.1`, `--clip-grad-norm 1.0`,
`--ema-decay 0.99` (per step: with ~100 steps per epoch the average spans about one
epoch). Deterministic for a given machine and torch (seeded), so a rerun gives the same
figures; the cosine schedule is the embedded default's (model/bootstrap.py's recipe).

    python bench/recipe.py [--images 2000] [--epochs 4] [--image-size 96] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, table
from model.config import TrainConfig
from model.trainer import Trainer

OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "warmup 1 epoch": {"warmup_epochs": 1},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "clip grad norm 1.0": {"clip_grad_norm": 1.0},
    "EMA 0.99": {"ema_decay": 0.99},
    "all four": {"warmup_epochs": 1, "label_smoothing": 0.1, "clip_grad_norm": 1.0,
                 "ema_decay": 0.99},
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--only", nargs="*", choices=list(OPTIONS), default=None)
    args = ap.parse_args()
    base = {"dataset": f"synthetic:{args.images}", "image_size": args.image_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "dropout": 0.0,
            "scheduler": "cosine", "workers": 1, "seed": 0}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for name, extra in OPTIONS.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            result = Trainer(TrainConfig(**base, **extra), data_dir=home / "data",
                             models_dir=home / "models",
                             run_dir=home / "runs" / name.replace(" ", "-")).fit()  # fmt: skip
            seconds = time.perf_counter() - t0
            h = result.history
            rows.append([name, *(f"{e['val_top1']:.1%}" for e in h),
                         f"{h[-1]['val_loss']:.3f}", f"{seconds:.0f}"])  # fmt: skip
            print(f"{name}: {rows[-1][1:]}", file=sys.stderr, flush=True)
    print(f"Machine: {machine()}\nsynthetic:{args.images} at {args.image_size} px, batch "
          f"{args.batch_size}, {args.epochs} epochs, cosine, no dropout, seed 0\n")  # fmt: skip
    heads = ["option", *(f"ep {i + 1} top-1" for i in range(args.epochs)), "last val loss", "s"]
    print(table(heads, rows))


if __name__ == "__main__":
    main()
