"""int8 (model/quantize.py) against bf16 and fp32 for the 1000-class AlexNet at 224: speed
of the quantized network eager, under torch.compile and as the AOTInductor programs the
service serves; what quantizing, compiling and the load-time guard cost; the start-to-ready
of `alexnet serve` with ALEXNET_PRECISION=int8 with and without the cache.

    python bench/int8.py [--seconds 3] [--no-serve]

Random weights with fc8 scaled x20 (bench/serve.py's serving_home), so agreement says
how int8 moves a peaked random network, not a trained one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, table
from model import quantize
from model.device import Placement, cpu_has_fast_bf16
from model.engine import Classifier, for_inference, predict
from model.pretrained import IMAGENET_PRE

CPU = torch.device("cpu")


def speed(run: torch.nn.Module, bs: int, seconds: float) -> float:
    x = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8)
    for _ in range(2):
        predict(run, x, 5)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2 * bs:
        predict(run, x, 5)
        n += bs
    return n / (time.perf_counter() - t0)


def main() -> None:
    from app.registry import PROBE_IMAGES, _calibration, _probe_batch, prepare
    from model.checkpoint import load_version
    from model.predictor import Predictor
    from tests.helpers.server import Server
    from tests.helpers.versions import make_version

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-serve", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    home = tmp / "home"
    card = make_version(home / "models", num_classes=1000, image_size=224, probes=True,
                        activate=True)  # fmt: skip
    vdir = home / "models" / card.version
    sizes = (1, 8, 32)

    t0 = time.perf_counter()
    loaded = prepare(vdir, Placement(CPU, "int8"), warmup_batch_sizes=sizes,
                     cache_dir=home / "cache")  # fmt: skip
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = prepare(vdir, Placement(CPU, "int8"), warmup_batch_sizes=sizes,
                    cache_dir=home / "cache")  # fmt: skip
    cached = time.perf_counter() - t0
    check, i8 = loaded.precision_check, loaded.precision_check["int8"]
    assert again.precision_check["int8"]["cache"] == "hit", again.precision_check

    def fresh(prec: str) -> Classifier:
        return for_inference(load_version(vdir)[0], IMAGENET_PRE, Placement(CPU, prec))

    fp32, bf16 = fresh("fp32"), fresh("bf16")
    ref = Predictor(load_version(vdir)[0], card, Placement(CPU, "fp32"))
    t0 = time.perf_counter()
    qnet = quantize.quantize(fresh("fp32").net, _calibration(ref, vdir, card))
    quant_s = time.perf_counter() - t0
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(qnet)  # (predict() calls .eval())
    eager = for_inference(fresh("fp32").net, IMAGENET_PRE, Placement(CPU, "fp32"),
                          channels_last=False)  # fmt: skip
    eager.net = qnet
    torch._inductor.config.freezing = True
    comp = for_inference(fresh("fp32").net, IMAGENET_PRE, Placement(CPU, "fp32"),
                         channels_last=False)  # fmt: skip
    comp.net = torch.compile(qnet, dynamic=False)  # type: ignore[assignment]
    t0 = time.perf_counter()
    for bs in (1, 32):
        predict(comp, torch.zeros(bs, 3, 224, 224, dtype=torch.uint8), 1)
    comp_s = time.perf_counter() - t0

    probe_x = _probe_batch(ref, PROBE_IMAGES)
    ref_top1 = predict(fp32, probe_x, 1).indices[:, 0]

    def agree(run: torch.nn.Module) -> str:
        top1 = predict(run, probe_x, 1).indices[:, 0]
        return f"{float((top1 == ref_top1).float().mean()):.1%}"

    s = args.seconds
    # the served programs (from the cache prepare() left; whether the guard passed or not)
    program = quantize.build(lambda: fresh("fp32").net, lambda: _calibration(ref, vdir, card),
                             version=card.version,
                             key=quantize.cache_key(card.sha256, card.image_size),
                             sizes=sizes, image_size=224, cache_dir=home / "cache",
                             allow_build=False).program  # fmt: skip
    served = for_inference(program, IMAGENET_PRE, Placement(CPU, "int8"), channels_last=False)
    rows = [
        ["fp32, channels_last", "-", f"{speed(fp32, 1, s):.0f}", f"{speed(fp32, 32, s):.0f}",
         "100.0%"],
        [f"bf16 weights, channels_last{' (auto here)' if cpu_has_fast_bf16() else ''}", "-", f"{speed(bf16, 1, s):.0f}",
         f"{speed(bf16, 32, s):.0f}", agree(bf16)],
        ["int8 PT2E, eager (reference kernels)", f"{quant_s:.1f}", f"{speed(eager, 1, 1):.1f}",
         f"{speed(eager, 32, 1):.1f}", agree(eager)],
        ["int8, torch.compile (freezing, static shapes)", f"{comp_s:.1f} (b=1, 32)",
         f"{speed(comp, 1, s):.0f}", f"{speed(comp, 32, s):.0f}", agree(comp)],
        ["int8, AOTInductor per batch size (served)", f"{i8.get('compile_s', 0):.1f} (b=1, 8, 32)",
         f"{speed(served, 1, s):.0f}", f"{speed(served, 32, s):.0f}", agree(served)],
    ]  # fmt: skip
    print(f"Machine: {machine()}\nModel: AlexNet 1000 classes at 224x224, random weights, "
          f"fc8 x20; agreement: top-1 vs fp32 on the {PROBE_IMAGES} built-in images\n")  # fmt: skip
    print(table(["variant", "build s", "img/s b=1", "img/s b=32", "top-1 agreement"], rows))
    p = check["parity"]["int8"]
    print(
        f"\nprepare() at int8, first load (quantize {i8['quantize_s']} s + compile "
        f"{i8['compile_s']} s + guard): {first:.1f} s; again from the cache: {cached:.1f} s "
        f"(program load {again.precision_check['int8']['load_s']} s)"
    )
    print(f"served: {loaded.placement.precision}; fallback: {check.get('fallback')}")
    print(f"guard: agreement {check['agreement']['int8']:.1%}, probes passed {p['passed']}, "
          f"max probability difference {p['max_difference']}, max logit difference "
          f"{p['max_logit_difference']} of the spread")  # fmt: skip
    if args.no_serve:
        return
    out = []
    shutil.rmtree(home / "cache")
    for label in ("no cache", "cached"):
        t0 = time.perf_counter()
        with Server(home, ALEXNET_PRECISION="int8", ALEXNET_DEVICE="cpu").start(
            timeout_s=600
        ) as srv:
            ready = time.perf_counter() - t0
            info = httpx.get(srv.url + "/v1/models/active", timeout=10).json()
            i8 = info["precision_check"].get("int8", {})
            out.append(
                [
                    label,
                    f"{ready:.1f}",
                    info["precision"],
                    i8.get("cache"),
                    i8.get("quantize_s", "-"),
                    i8.get("compile_s", "-"),
                    i8.get("load_s"),
                ]
            )
    print()
    print(
        table(
            [
                "alexnet serve, ALEXNET_PRECISION=int8",
                "start to ready s",
                "served",
                "int8 cache",
                "quantize s",
                "compile s",
                "program load s",
            ],
            out,
        )
    )


if __name__ == "__main__":
    main()
