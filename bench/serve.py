"""HTTP serving benchmark: the real server under wrk, with real JPEG photos.

(a) our defaults (through /v1/classify, and through the Open Inference Protocol's /v2
infer with the binary extension); (b) the same server with batching off and fp32 (a tutorial server);
(c) the in-process limit: decode + preprocess + forward, no HTTP, same precision as (a).
Concurrency 1, 8 and 32. Also: resident memory after warm-up and after each run, and the
time from start to ready with and without torch.compile.

    python bench/serve.py [--seconds 10]      # needs wrk (apt-get install wrk)
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import jpeg_photos, machine, table
from bench.launch import Server, proc_status_kb
from model.checkpoint import (
    ModelCard,
    load_version,
    save_version,
    write_active,
)
from model.device import resolve
from model.engine import for_inference, predict
from model.images import decode_image, to_tensor
from model.network import build_model
from model.pretrained import IMAGENET_PRE
from model.transforms import EvalTransform

LUA = """
local files = {%s}
local bodies = {}
local boundary = "----alexnetbench"
for i, path in ipairs(files) do
  local f = assert(io.open(path, "rb")); local data = f:read("*a"); f:close()
  bodies[i] = "--" .. boundary .. "\\r\\nContent-Disposition: form-data; name=\\"file\\"; filename=\\"p.jpg\\"\\r\\n" ..
    "Content-Type: image/jpeg\\r\\n\\r\\n" .. data .. "\\r\\n--" .. boundary .. "--\\r\\n"
end
local n = 0
request = function()
  n = n + 1
  local body = bodies[(n %% #bodies) + 1]
  return wrk.format("POST", "/v1/classify", {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
end
"""

# The same photos as an Open Inference Protocol request, binary extension: the JSON header,
# then the file as one BYTES element (4-byte little-endian length, then the bytes).
LUA_V2 = """
local files = {%s}
local bodies = {}
local function le32(n)
  return string.char(n %% 256, math.floor(n / 256) %% 256, math.floor(n / 65536) %% 256,
                     math.floor(n / 16777216) %% 256)
end
for i, path in ipairs(files) do
  local f = assert(io.open(path, "rb")); local data = f:read("*a"); f:close()
  local head = '{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":' ..
    '{"binary_data_size":' .. (#data + 4) .. '}}],"outputs":[{"name":"probabilities",' ..
    '"parameters":{"classification":5}}]}'
  bodies[i] = {head = #head, body = head .. le32(#data) .. data}
end
local n = 0
request = function()
  n = n + 1
  local b = bodies[(n %% #bodies) + 1]
  return wrk.format("POST", "/v2/models/alexnet/infer",
                    {["Inference-Header-Content-Length"] = tostring(b.head)}, b.body)
end
"""
V2 = "(a) defaults, /v2 infer"


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def start(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, float]:
    """A real server, ready: (process, url, seconds from spawn to /readyz 200)."""
    t0 = time.perf_counter()
    srv = Server(home, **env).start(timeout_s=600)
    assert srv.proc is not None
    return srv.proc, srv.url, time.perf_counter() - t0


def wrk(url: str, script: Path, conc: int, seconds: int) -> dict[str, float]:
    """One wrk run: requests/s, the request count, the 2xx count and rate ("ok", "ok_rps":
    a server that sheds answers fast 429s), p50/p99 latency in ms, non-2xx responses, and the CPU seconds wrk itself took."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{seconds}s", "--latency", "--timeout", "30s",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout  # fmt: skip
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)

    def lat(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert m, out
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v if unit == "ms" else v * 1000

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    n = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert n, out
    requests, errors = float(n.group(1)), float(bad.group(1)) if bad else 0.0
    return {
        "rps": rps,
        "requests": requests,
        "ok": requests - errors,
        "ok_rps": (requests - errors) / seconds,
        "p50": lat("50"),
        "p99": lat("99"),
        "errors": errors,
        "cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),  # wrk's own
    }


def in_process(version_dir: Path, datas: list[bytes], seconds: float) -> tuple[float, float]:
    """(img/s at batch 32, median ms for one image) for decode + preprocess + forward."""
    net, card = load_version(version_dir)
    model = for_inference(net, card.preprocessing, resolve("auto", "auto"))
    tf = EvalTransform(card.preprocessing)

    def prep(d: bytes) -> torch.Tensor:
        return tf(to_tensor(decode_image(d, min_side=card.preprocessing.min_side)))

    for _ in range(2):
        predict(model, torch.stack([prep(d) for d in datas[:8]]), 5)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(datas) * 3, 32):
            batch = [prep(datas[(i + j) % len(datas)]) for j in range(32)]
            predict(model, torch.stack(batch), 5)
            n += 32
    rate = n / (time.perf_counter() - t0)
    one = []
    for d in datas * 3:
        t = time.perf_counter()
        predict(model, prep(d)[None], 5)
        one.append((time.perf_counter() - t) * 1000)
    return rate, sorted(one)[len(one) // 2]


def serving_home(tmp: Path, lua: str) -> tuple[Path, ModelCard, list[Path], Path]:
    """A home serving a 1000-class AlexNet at 224 (random weights, fc8 sharpened so its
    softmax is peaked like a trained model's), 640x480 JPEG photos, and the wrk script
    `lua` (a format string taking the photos' quoted paths) written beside them."""
    home = tmp / "home"
    torch.manual_seed(0)
    net = build_model("alexnet", num_classes=1000)
    with torch.no_grad():
        net.classifier[6].weight.mul_(20)
    card = save_version(home / "models", net, arch="alexnet",
                        labels=[f"class {i}" for i in range(1000)], pre=IMAGENET_PRE)  # fmt: skip
    write_active(home / "models", card.version)
    photos = jpeg_photos(tmp / "photos", (640, 480))
    script = tmp / "post.lua"
    script.write_text(lua % ", ".join(f'"{p}"' for p in photos))
    return home, card, photos, script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--no-compile-timing", action="store_true")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        home, card, photos, script = serving_home(Path(tmp), LUA)
        v2_script = script.with_name("post_v2.lua")
        v2_script.write_text(LUA_V2 % ", ".join(f'"{p}"' for p in photos))
        configs = {
            "(a) defaults": {},
            "(b) no batching, fp32": {"ALEXNET_MAX_BATCH_SIZE": "1", "ALEXNET_PRECISION": "fp32"},
        }
        results: dict[str, dict[int, dict[str, float]]] = {}
        mem_rows, ready_rows = [], []
        for name, env in configs.items():
            proc, url, ready_s = start(home, env)
            ready_rows.append([name, "no", f"{ready_s:.1f}"])
            mem = [f"{rss_mb(proc.pid):.0f}"]
            results[name] = {}
            for conc in (1, 8, 32):
                wrk(url, script, conc, 2)  # warm the connection pool and allocator
                results[name][conc] = wrk(url, script, conc, args.seconds)
                mem.append(f"{rss_mb(proc.pid):.0f}")
                if name == "(a) defaults":  # the same server through the protocol
                    results.setdefault(V2, {})[conc] = wrk(url, v2_script, conc, args.seconds)
            mem_rows.append([name, *mem])
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        if not args.no_compile_timing:
            proc, url, ready_s = start(home, {"ALEXNET_COMPILE": "true"})
            ready_rows.append(["(a) defaults", "yes (ALEXNET_COMPILE=true)", f"{ready_s:.1f}"])
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        datas = [p.read_bytes() for p in photos]
        c_rate, c_one_ms = in_process(home / "models" / card.version, datas, args.seconds)

    a, b = results["(a) defaults"], results["(b) no batching, fp32"]
    rows = []
    for conc in (1, 8, 32):
        for name, r in (("(a) defaults", a), (V2, results[V2]), ("(b) no batching, fp32", b)):
            x = r[conc]
            rows.append(
                [
                    conc,
                    name,
                    f"{x['ok_rps']:.1f}",
                    f"{x['p50']:.1f}",
                    f"{x['p99']:.1f}",
                    int(x["errors"]),
                ]
            )
        rows.append([conc, "(c) in-process limit", f"{c_rate:.1f}" if conc > 1 else f"{1000 / c_one_ms:.1f}",
                     f"{c_one_ms:.1f}" if conc == 1 else "-", "-", "-"])  # fmt: skip
    print(f"Machine: {machine()}\nModel: AlexNet, 1000 classes, 224x224; JPEG photos 640x480; "
          f"wrk -t1, {args.seconds} s per run\n")  # fmt: skip
    print(table(["concurrency", "server", "img/s (2xx)", "p50 ms", "p99 ms", "non-2xx"], rows))
    print("\n(img/s counts 2xx answers: a server that sheds answers its 429s fast)")
    print("\nRatios:")
    print(f"- (a)/(b) at c32: {a[32]['ok_rps'] / b[32]['ok_rps']:.2f}x (target >= 5x)")
    print(
        f"- (a)/(c) at c32: {a[32]['ok_rps'] / c_rate:.0%} of the in-process limit (target >= 80%)"
    )
    print(f"- p50 (a)/(b) at c1: {a[1]['p50'] / b[1]['p50']:.2f}x (target <= 1.2x)")
    print("\nResident memory (MB): after warm-up, after c1, c8, c32")
    print(table(["server", "warm", "c1", "c8", "c32"], mem_rows))
    print("\nStart to ready")
    print(table(["server", "compiled", "seconds"], ready_rows))


if __name__ == "__main__":
    main()
