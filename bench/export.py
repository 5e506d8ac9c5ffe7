"""Export benchmark: `alexnet export` to ONNX and .pt2 for a 224 px, 1000-class AlexNet
(time to export and check, file size, the largest probability difference to our model),
then the forward pass of each runtime at batch 1 and 32 on this CPU (fp32): our served
model (uint8 in, normalise, network, softmax; channels_last as served), ONNX Runtime's
CPU provider and the loaded torch.export program (both on the normalised input).

    python bench/export.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, table
from model import export
from model.checkpoint import load_version
from model.device import Placement
from model.predictor import Predictor
from tests.helpers.versions import make_version


def median_ms(f: Callable[[], object], n: int) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30, help="timed runs at batch 1 (32: a fifth)")
    args = ap.parse_args()
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        models, out = Path(tmp) / "models", Path(tmp) / "out"
        card = make_version(models, image_size=224, num_classes=1000, probes=True)
        vdir = models / card.version
        rows = []
        for fmt in ("onnx", "pt2"):
            t = time.perf_counter()
            r = export.export_version(vdir, fmt, out, force=True)
            rows.append([fmt, f"{time.perf_counter() - t:.1f}", f"{r.bytes / 1e6:.0f}",
                         f"{r.check.max_difference:.1e}", len(r.check.images)])  # fmt: skip
        net, card = load_version(vdir)
        ours = Predictor(net, card, Placement(torch.device("cpu"), "fp32")).model
        session = ort.InferenceSession(str(out / f"{card.version}.onnx"),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        program = torch.export.load(out / f"{card.version}.pt2").module()
        speed = []
        for batch, n in ((1, args.repeats), (32, max(3, args.repeats // 5))):
            u8 = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
            x = ours.norm(u8).float()
            xn = x.numpy()

            def run_ours(u8: torch.Tensor = u8) -> None:
                with torch.inference_mode():
                    torch.softmax(ours(u8), 1)

            def run_pt2(x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    program(x)

            cells = [median_ms(run_ours, n),
                     median_ms(lambda xn=xn: session.run([export.OUTPUT_NAME], {export.INPUT_NAME: xn}), n),
                     median_ms(run_pt2, n)]  # fmt: skip
            speed.append([batch, *(f"{c:.1f}" for c in cells),
                          *(f"{batch * 1000 / c:.0f}" for c in cells)])  # fmt: skip
    print(f"Machine: {machine()}\nModel: AlexNet, 1000 classes, 224x224, random weights, fp32\n")
    print(table(["format", "export + check s", "MB", "max |dp|", "check images"], rows))
    print()
    print(table(["batch", "ours ms", "onnxruntime ms", "pt2 ms", "ours img/s", "onnxruntime img/s",
                 "pt2 img/s"], speed))  # fmt: skip


if __name__ == "__main__":
    main()
