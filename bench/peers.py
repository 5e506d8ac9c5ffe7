"""A modern peer side by side: our server, LitServe with its dynamic batching, and a
batch-1 fp32 baseline, all under wrk in one run, at concurrency 1 and 32.

The same version (a 1000-class AlexNet at 224, bench/serve.py's home), the same 640x480
JPEG photos as the same multipart upload (field `file`), top-5 JSON back:

- ours: `alexnet serve` with its defaults;
- LitServe: a `LitAPI` (defined below) that loads the version with model/checkpoint.py's
  `load_version`, places it with `resolve("auto", "auto")` and `for_inference` (bf16 where
  the CPU has fast bf16, as ours), decodes with Pillow (model/images.py `decode_image`) and
  the same `EvalTransform`, batching on: max_batch_size 32, batch_timeout our
  `max_batch_wait_ms`;
- baseline: our server with ALEXNET_MAX_BATCH_SIZE=1 ALEXNET_PRECISION=fp32 (bench/serve.py's (b)).

LitServe's answers are checked first: its top-1 must equal ours for every photo. Server
CPU per image is the utime+stime of the server's whole process tree over each run
(/proc), divided by the images answered 2xx; img/s counts 2xx answers only (a 429 is fast
and would flatter a server that sheds).

LitServe is not a dependency of the project. Install it beside the venv, not into it:

    python3 -m venv /tmp/peers-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/peers-venv/lib/python3.11/site-packages/main-venv.pth
    /tmp/peers-venv/bin/pip install --no-deps litserve pyzmq   # torch, fastapi, uvicorn from the venv

(`.venv/bin/pip install litserve` works too: as of litserve 0.2.19 it changes none of the
project's pins, it adds litserve and pyzmq.) Then:

    python bench/peers.py [--seconds 10] [--litserve-python /tmp/peers-venv/bin/python]
    # needs wrk (apt-get install wrk)
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

DEFAULT_LITSERVE_PYTHON = Path("/tmp/peers-venv/bin/python")
CONCURRENCY = (1, 32)

# ----------------------------------------------------------------------------- the LitServe side


try:  # only in the LitServe interpreter; the class must be importable (spawned workers)
    import litserve as _ls  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    _ls = None

if _ls is not None:

    class AlexNetAPI(_ls.LitAPI):  # type: ignore[misc]
        """The peer: our version, placement and preprocessing, LitServe's serving."""

        def __init__(self, version_dir: Path, **kw: Any) -> None:
            super().__init__(**kw)
            self.version_dir = version_dir

        def setup(self, device: str) -> None:
            from model.checkpoint import load_version
            from model.device import resolve
            from model.engine import for_inference
            from model.transforms import EvalTransform

            net, card = load_version(self.version_dir)
            self.model = for_inference(net, card.preprocessing, resolve("auto", "auto"))
            self.transform = EvalTransform(card.preprocessing)
            self.min_side = card.preprocessing.min_side
            self.labels = card.labels

        def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe passes the form
            from model.images import decode_image, to_tensor

            data = request["file"].file.read()
            return self.transform(to_tensor(decode_image(data, min_side=self.min_side)))

        def batch(self, inputs: list[Any]) -> Any:
            import torch

            return torch.stack(inputs)

        def predict(self, x: Any) -> list[list[tuple[int, float]]]:
            from model.engine import predict

            return list(predict(self.model, x, 5).rows())

        def unbatch(self, output: list[Any]) -> list[Any]:
            return output

        def encode_response(self, row: list[tuple[int, float]]) -> dict[str, Any]:
            return {"predictions": [{"label": self.labels[i], "index": i, "probability": p}
                                    for i, p in row]}  # fmt: skip


def serve_litserve(
    version_dir: Path, port: int, max_batch_size: int, batch_timeout_s: float
) -> None:
    """Runs in the LitServe interpreter (`--serve-litserve`): LitServe's own server, on `port`."""
    from model.device import resolve

    assert _ls is not None, "litserve is not importable here"
    api = AlexNetAPI(version_dir, max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
    server = _ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    print(f"LitServe {_ls.__version__}, {resolve('auto', 'auto').precision}", flush=True)
    server.run(port=port, host="127.0.0.1", log_level="warning", generate_client_file=False,
               num_api_servers=1)  # fmt: skip


# ----------------------------------------------------------------------------- the run


def litserve_python(given: Path | None) -> Path:
    candidates = [given] if given else [Path(sys.executable), DEFAULT_LITSERVE_PYTHON]
    for py in candidates:
        if py and py.exists():
            ok = subprocess.run([str(py), "-c", "import litserve, torch"], capture_output=True)
            if ok.returncode == 0:
                return py
    raise SystemExit("LitServe not found: install it as this file's docstring says "
                     "(or pass --litserve-python PATH)")  # fmt: skip


class LitServeProcess:
    def __init__(self, python: Path, version_dir: Path, log: Path, batch_wait_ms: float) -> None:
        from bench.launch import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--serve-litserve",
                                          str(version_dir), "--port", str(self.port),
                                          "--batch-timeout-s", str(batch_wait_ms / 1000)],
                                         cwd=_REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout_s: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LitServe exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"LitServe not up in {timeout_s} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        import os

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its api server and inference workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def top5(url: str, path: str, photo: Path) -> list[tuple[int, float]]:
    import httpx

    r = httpx.post(
        url + path, files={"file": ("p.jpg", photo.read_bytes(), "image/jpeg")}, timeout=60
    )
    r.raise_for_status()
    return [(int(p["index"]), float(p["probability"])) for p in r.json()["predictions"]]


def same_answer(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> str:
    """ "same" (top-1 equal), "tie" (our top-1 is in theirs with their top-1's probability,
    within 0.002: two classes that round to one value in bf16, in whichever order) or "".
    """
    if ours[0][0] == theirs[0][0]:
        return "same"
    p1 = theirs[0][1]
    return "tie" if any(i == ours[0][0] and abs(p - p1) <= 0.002 for i, p in theirs) else ""


def measure(url: str, script: Path, pid: int, seconds: int) -> dict[int, dict[str, float]]:
    from bench.cpu_profile import tree_cpu_s
    from bench.serve import wrk

    out = {}
    for conc in CONCURRENCY:
        wrk(url, script, conc, 2)  # warm the connections, the allocator, the batch sizes
        c0 = tree_cpu_s(pid)
        r = wrk(url, script, conc, seconds)
        r["cpu_ms"] = (tree_cpu_s(pid) - c0) * 1000 / max(r["ok"], 1)
        out[conc] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--litserve-python", type=Path, default=None,
                    help=f"an interpreter that imports litserve and torch (default: this one, "
                         f"else {DEFAULT_LITSERVE_PYTHON})")  # fmt: skip
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for our server (not the baseline), e.g. "
                         "ALEXNET_PRECISION=int8; repeatable")  # fmt: skip
    ap.add_argument("--serve-litserve", type=Path, metavar="VERSION_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    ap.add_argument("--batch-timeout-s", type=float, default=0.002, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_litserve:
        serve_litserve(args.serve_litserve, args.port, 32, args.batch_timeout_s)
        return

    from app.settings import Settings
    from bench.common import machine, table
    from bench.launch import Server
    from bench.serve import LUA, serving_home

    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    lit_py = litserve_python(args.litserve_python)
    wait_ms = float(Settings.model_fields["max_batch_wait_ms"].default)
    results: dict[str, dict[int, dict[str, float]]] = {}
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        home, card, photos, script = serving_home(Path(tmp), LUA)
        lit_script = script.with_name("post_litserve.lua")
        lit_script.write_text(script.read_text().replace('"/v1/classify"', '"/predict"'))

        ours_top5: list[list[tuple[int, float]]] = []
        ours_env = dict(e.split("=", 1) for e in args.env)
        if ours_env:
            notes.append("ours with " + " ".join(args.env))
        for name, env in (("ours (defaults)", ours_env),
                          ("baseline: batch 1, fp32", {"ALEXNET_MAX_BATCH_SIZE": "1",
                                                       "ALEXNET_PRECISION": "fp32"})):  # fmt: skip
            srv = Server(home, **env).start(timeout_s=600)
            assert srv.proc is not None
            try:
                if not ours_top5:
                    ours_top5 = [top5(srv.url, "/v1/classify", p) for p in photos]
                    info = json.loads(_get(srv.url + "/v1/models/active"))
                    why = (info.get("precision_check") or {}).get("fallback")
                    notes.append(
                        f"ours: {info.get('precision', '?')}" + (f" ({why})" if why else "")
                    )
                results[name] = measure(srv.url, script, srv.proc.pid, args.seconds)
            finally:
                srv.terminate(30)
            if name.startswith("ours"):  # LitServe between the two, same warm machine
                lit = LitServeProcess(
                    lit_py, home / "models" / card.version, Path(tmp) / "litserve.log", wait_ms
                )
                try:
                    lit.wait_ready()
                    theirs = [top5(lit.url, "/predict", p) for p in photos]
                    verdicts = [same_answer(a, b) for a, b in zip(ours_top5, theirs, strict=True)]
                    if not all(verdicts):
                        bad = [
                            (a[:2], b[:2])
                            for a, b, v in zip(ours_top5, theirs, verdicts, strict=True)
                            if not v
                        ]
                        raise SystemExit(f"LitServe's top-1 differs from ours: {bad}")
                    ties = verdicts.count("tie")
                    notes.append(f"LitServe top-1 = ours on {len(photos)}/{len(photos)} photos"
                                 + (f" ({ties} a tie in bf16)" if ties else ""))  # fmt: skip
                    results["LitServe, batch 32"] = measure(
                        lit.url, lit_script, lit.proc.pid, args.seconds
                    )
                finally:
                    lit.stop()
                banner = Path(tmp, "litserve.log").read_text().splitlines()
                notes += [line for line in banner if line.startswith("LitServe ")][:1]

    rows: list[list[object]] = []
    for conc in CONCURRENCY:
        for name in ("ours (defaults)", "LitServe, batch 32", "baseline: batch 1, fp32"):
            r = results[name][conc]
            rows.append([conc, name, f"{r['ok_rps']:.1f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
                         int(r["errors"]), f"{r['cpu_ms']:.1f}"])  # fmt: skip
    ours, lit_r, base = (
        results[n] for n in ("ours (defaults)", "LitServe, batch 32", "baseline: batch 1, fp32")
    )
    print(f"Machine: {machine()}\nModel: AlexNet, 1000 classes, 224x224; JPEG photos 640x480, multipart; "
          f"wrk -t1, {args.seconds} s per run after a 2 s warm-up; LitServe batch_timeout "
          f"{wait_ms / 1000:g} s (our max_batch_wait_ms); {'; '.join(notes)}\n")  # fmt: skip
    print(table(["concurrency", "server", "img/s (2xx)", "p50 ms", "p99 ms", "non-2xx",
                 "server CPU ms/img"], rows))  # fmt: skip

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("inf")

    r1 = ratio(ours[32]["ok_rps"], base[32]["ok_rps"])
    r2 = ratio(ours[32]["ok_rps"], lit_r[32]["ok_rps"])
    r3 = ratio(ours[1]["p50"], base[1]["p50"])
    print("\nRatios:")
    print(
        f"- ours/baseline img/s at c32: {r1:.2f}x (target >= 8x: {'met' if r1 >= 8 else 'not met'})"
    )
    print(
        f"- ours/LitServe img/s at c32: {r2:.2f}x (target >= 1.5x: {'met' if r2 >= 1.5 else 'not met'})"
    )
    print(
        f"- p50 ours/baseline at c1: {r3:.2f}x (target <= 0.6x: {'met' if r3 <= 0.6 else 'not met'})"
    )


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=10).text


if __name__ == "__main__":
    main()
