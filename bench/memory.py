"""Resident memory of the real server: after warm-up, then after each of several load runs
in a row (wrk at concurrency 32 with 640x480 JPEG photos), per precision. The question is
whether it stays under 1 GB with the 1000-class AlexNet at 224 and stays flat.

    python bench/memory.py [--runs 5] [--seconds 10] [--precision fp32 --precision int8]

int8 is built at its first load (quantized and compiled per batch size: minutes on 2
cores; cached after) and, on this random-weights model, needs ALEXNET_MIN_AGREEMENT=0.95
to be served at all (its agreement with fp32 is ~97%, under the 99% guard): the script sets
it for the reduced precisions and reports what was really served.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, table
from bench.launch import Server, proc_status_kb
from bench.serve import LUA, serving_home, wrk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument(
        "--precision", action="append", help="fp32, bf16, int8 (default: fp32 and int8)"
    )
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    precisions = args.precision or ["fp32", "int8"]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home, _card, _photos, script = serving_home(Path(tmp), LUA)
        for precision in precisions:
            env = {"ALEXNET_PRECISION": precision}
            if precision != "fp32":
                env["ALEXNET_MIN_AGREEMENT"] = "0.95"
            t0 = time.monotonic()
            srv = Server(home, **env).start(timeout_s=1800)
            ready_s = time.monotonic() - t0
            assert srv.proc is not None
            try:
                with urllib.request.urlopen(srv.url + "/v1/models/active", timeout=30) as r:
                    served = json.loads(r.read()).get("precision", "?")
                pid = srv.proc.pid
                after = [proc_status_kb(pid, "VmRSS") / 1024]
                rates = []
                for _ in range(args.runs):
                    res = wrk(srv.url + "/v1/classify", script, 32, args.seconds)
                    rates.append(res["ok_rps"])
                    after.append(proc_status_kb(pid, "VmRSS") / 1024)
                peak = proc_status_kb(pid, "VmHWM") / 1024
            finally:
                srv.terminate(30)
            rows.append([precision, served, f"{ready_s:.0f}", f"{after[0]:.0f}",
                         " / ".join(f"{m:.0f}" for m in after[1:]), f"{peak:.0f}",
                         f"{after[-1] - after[1]:+.0f}",
                         " / ".join(f"{r:.0f}" for r in rates)])  # fmt: skip
    print(f"Machine: {machine()}\nModel: AlexNet, 1000 classes, 224x224 (random weights); "
          f"wrk -t1 -c32, {args.seconds} s per run, {args.runs} runs in a row\n")  # fmt: skip
    print(table(["asked", "served", "ready s", "RSS MB after warm-up", "RSS MB after each run",
                 "peak MB", "last - first run", "img/s each run"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
