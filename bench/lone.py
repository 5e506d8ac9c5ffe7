"""A lone request after a pause: is it as fast as back-to-back ones?

One client, one kept-alive connection, one JPEG photo per request (the image itself as the
body), the real server (`alexnet serve`) with the 1000-class AlexNet at 224 of
bench/serve.py. For each pause between requests (0 = back to back, then 0.05, 0.5 and 2 s)
the median and p90 latency, and the ratio of each median to back to back's. Each
`--env KEY=VALUE` set (repeatable; `--config NAME:KEY=VALUE,KEY=VALUE` for several
servers in one run) is a server of its own, so settings can be compared in one run.

    python bench/lone.py [--requests 30] [--config 'passive:OMP_WAIT_POLICY=PASSIVE'] ...
"""

from __future__ import annotations

import argparse
import http.client
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, table
from bench.serve import serving_home, start

PAUSES = (0.0, 0.05, 0.5, 2.0)


def latencies(port: int, body: bytes, pause_s: float, n: int) -> list[float]:
    """`n` requests on one connection, `pause_s` apart; each one's latency in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    try:
        for i in range(n + 2):
            if pause_s:
                time.sleep(pause_s)
            t0 = time.perf_counter()
            conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": "image/jpeg"})
            r = conn.getresponse()
            r.read()
            ms = (time.perf_counter() - t0) * 1000
            assert r.status == 200, r.status
            if i >= 2:  # the first two after a change of rhythm are not counted
                out.append(ms)
    finally:
        conn.close()
    return out


STAGES = ("decode", "queue", "inference")


def stage_sums(port: int) -> dict[str, float]:
    """The server's own per-stage seconds (alexnet_stage_seconds) and the request count."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for stage in STAGES:
        m = re.search(rf'^alexnet_stage_seconds_sum{{stage="{stage}"}} ([0-9.e+-]+)$', text, re.M)
        out[stage] = float(m.group(1)) if m else 0.0
    m = re.search(r'^alexnet_stage_seconds_count{stage="inference"} ([0-9.e+-]+)$', text, re.M)
    out["n"] = float(m.group(1)) if m else 0.0
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def parse_configs(specs: list[str]) -> dict[str, dict[str, str]]:
    configs: dict[str, dict[str, str]] = {"defaults": {}}
    for spec in specs:
        name, _, pairs = spec.partition(":")
        env = dict(p.split("=", 1) for p in pairs.split(",") if p)
        configs[name] = env
    return configs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30, help="per pause (2 s pauses: fewer)")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME:KEY=VALUE,KEY=VALUE: one more server with these settings")  # fmt: skip
    args = ap.parse_args()
    configs = parse_configs(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home, _card, photos, _script = serving_home(Path(tmp), "%s")
        body = photos[0].read_bytes()
        for name, env in configs.items():
            proc, url, _ready = start(home, env)
            port = int(url.rsplit(":", 1)[1])
            try:
                latencies(port, body, 0.0, 10)  # warm
                base = None
                for pause in PAUSES:
                    n = args.requests if pause < 1 else max(8, args.requests // 3)
                    before = stage_sums(port)
                    xs = latencies(port, body, pause, n)
                    after = stage_sums(port)
                    count = max(1.0, after["n"] - before["n"])
                    per = [f"{(after[k] - before[k]) / count * 1000:.1f}" for k in STAGES]
                    p50 = pct(xs, 0.5)
                    base = base or p50
                    rows.append([name, f"{pause:g}", n, f"{p50:.1f}", f"{pct(xs, 0.9):.1f}",
                                 f"{p50 / base:.2f}x", *per])  # fmt: skip
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    print(f"Machine: {machine()}\nModel: AlexNet, 1000 classes, 224x224; one 640x480 JPEG "
          "as the body; one client, one connection\n")  # fmt: skip
    print(table(["server", "pause s", "requests", "p50 ms", "p90 ms", "p50 / back to back",
                 "decode ms", "queue ms", "model ms"], rows))  # fmt: skip
    print("\n(decode, queue and model: the means of the server's alexnet_stage_seconds)")
    print("\nTarget: with 0.5 s and 2 s pauses, p50 within 1.2x of back to back.")


if __name__ == "__main__":
    main()
