"""Where each request's CPU time goes: the real server under py-spy and wrk.

The server (bench/serve.py's home: a 1000-class AlexNet at 224, 640x480 JPEG photos) runs
as `alexnet serve`; after a warm-up, `py-spy record --pid` samples every Python thread
while `wrk -c32` drives it for `--seconds`. The CPU time itself comes from /proc: the
whole process tree's utime+stime over the measured window, and each thread's from
/proc/PID/task/TID/stat. Each Python thread's CPU is spread over its stages in proportion
to its active samples (waits excluded); the threads py-spy cannot see (the model's native
OpenMP workers) are reported as a residual. Stages: `classify_stack`, a pure function of a
sampled stack, tested in tests/unit/test_bench_profile.py. (Not bench/profile.py: run as a
script, bench/ is sys.path[0], and a profile.py there shadows the standard library's,
which torch._dynamo imports through cProfile.)

    python bench/cpu_profile.py [--seconds 10] [--concurrency 32] [--env ALEXNET_MAX_BATCH_SIZE=1]
                            [--raw-body] [--rate 100]
    # needs wrk (apt-get install wrk) and py-spy (pip install py-spy); py-spy attaches with
    # ptrace: root, or CAP_SYS_PTRACE in a container (docker run --cap-add SYS_PTRACE)

py-spy runs in its non-blocking mode by default (`--blocking` to pause the server for
each sample): it then costs the server nothing but the CPU it takes itself, which is
reported beside the table because on a small machine it competes for the same cores.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

# ----------------------------------------------------------------------------- stages

HTTP = "HTTP parsing (protocol, httptools, body receive)"
MULTIPART = "multipart parsing"
ROUTING = "routing and validation"
MIDDLEWARE = "middleware (app/middleware.py, starlette/fastapi ASGI layers)"
DECODE = "decode (Pillow, model/images.py)"
RESIZE = "resize and normalise"
QUEUE = "queueing and thread hops"
LOOP = "event loop, native (uvloop: sockets, epoll)"
MODEL = "model, Python thread (run_batch -> engine)"
MODEL_NATIVE = "model, native OpenMP threads (residual: /proc CPU of threads py-spy cannot see)"
RESPONSE = "response encoding"
LOGGING = "logging"
METRICS = "metrics"
ROUTE = "route handler code (app/routes, ids, feedback keep)"
OTHER = "other"
EXITED = "threads that exited in the window (unattributed)"
WAIT = "waiting (not CPU)"  # samples excluded from the attribution

STAGE_ORDER = (HTTP, MULTIPART, ROUTING, MIDDLEWARE, DECODE, RESIZE, QUEUE, LOOP, MODEL,
               MODEL_NATIVE, RESPONSE, LOGGING, METRICS, ROUTE, OTHER, EXITED)  # fmt: skip

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

_PENDING = "pydantic"  # validation or serialisation: the caller decides which
_TRANSPARENT = ""


def parse_frame(frame: str) -> tuple[str, str]:
    """`"Class.method (pkg/file.py:12)"` as (function, file)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


def _under(file: str, *prefixes: str) -> bool:
    return any(file == p or file.startswith(p) or f"/{p}" in file for p in prefixes)


def _decisive(func: str, file: str) -> str | None:
    """The stage a frame decides on its own, `_PENDING` for pydantic, `_TRANSPARENT` for a
    frame that decides nothing, None for a frame left to the weak rules."""
    if _under(file, "logging/", "uvicorn/logging.py"):
        return LOGGING
    if _under(file, "prometheus_client/", "app/metrics.py", "app/drift.py"):
        return METRICS
    if _under(file, "torchvision/transforms", "model/transforms.py"):
        return RESIZE
    if _under(file, "PIL/", "model/images.py", "torchvision/io/"):
        return DECODE
    if _under(file, "model/predictor.py"):
        return DECODE if func.endswith("decode") else MODEL
    if _under(file, "model/engine.py", "model/network.py", "app/registry.py"):
        return MODEL
    if _under(file, "app/state.py"):
        return MODEL if func.endswith("run_batch") else ROUTE
    if _under(file, "python_multipart/", "multipart/", "starlette/formparsers.py", "tempfile.py"):
        return MULTIPART
    if _under(file, "starlette/datastructures.py"):
        return MULTIPART if func.startswith(("UploadFile", "FormData")) else ROUTING
    if _under(file, "app/intake.py"):
        if func.startswith("Decoder"):
            return QUEUE
        return HTTP if func in ("read_body", "media_type", "is_raw_body") else MULTIPART
    if _under(file, "uvicorn/protocols/"):
        return None if func.endswith("run_asgi") else HTTP
    if _under(file, "app/protocol.py", "h11/", "httptools/", "starlette/requests.py"):
        return HTTP
    if _under(file, "pydantic/", "pydantic_core/", "fastapi/_compat"):
        return _PENDING
    if _under(file, "fastapi/routing.py"):
        if func.endswith(("serialize_response", "_prepare_response_content")):
            return RESPONSE
        return _TRANSPARENT if func.endswith("run_endpoint_function") else ROUTING
    if _under(file, "fastapi/dependencies/", "fastapi/params.py", "starlette/routing.py",
              "starlette/convertors.py", "app/deps.py"):  # fmt: skip
        return ROUTING
    if _under(file, "starlette/responses.py", "fastapi/responses.py", "fastapi/encoders.py",
              "json/", "orjson", "app/errors.py"):  # fmt: skip
        return RESPONSE
    if _under(file, "app/schemas.py"):
        return ROUTE if func == "new_prediction_id" else RESPONSE
    if _under(file, "app/middleware.py", "starlette/middleware/", "fastapi/middleware/",
              "uvicorn/middleware/", "starlette/_exception_handler.py", "fastapi/telemetry/",
              "fastapi/_body_limit.py", "starlette/applications.py", "fastapi/applications.py"):  # fmt: skip
        return MIDDLEWARE
    if _under(file, "app/routes/", "app/feedback.py", "app/oip.py"):
        return ROUTE
    if _under(file, "app/batching.py", "queue.py", "anyio/", "starlette/concurrency.py"):
        return None if func == "WorkerThread.run" else QUEUE
    if _under(file, "concurrent/futures/"):
        return None if func in ("_worker", "_WorkItem.run") else QUEUE
    if _under(file, "threading.py"):
        return None if func.startswith(("Thread.run", "Thread._bootstrap")) else QUEUE
    if _under(file, "asyncio/"):
        loop_roots = ("run_forever", "_run_once", "run_until_complete", "Handle._run",
                      "Runner.run", "_read_ready", "_write_ready", "_process_events")  # fmt: skip
        return None if func.endswith(loop_roots) or "runners.py" in file else QUEUE
    if _under(file, "contextlib.py", "inspect.py", "functools.py", "typing.py", "secrets.py",
              "random.py", "<frozen"):  # fmt: skip
        return _TRANSPARENT
    return None


def _weak(func: str, file: str) -> str | None:
    """Frames that decide only when nothing more specific is on the stack."""
    if _under(file, "torch/", "torchvision/"):
        return MODEL
    if _under(file, "asyncio/", "uvicorn/server.py", "uvloop/"):
        return LOOP
    if _under(file, "uvicorn/protocols/"):  # run_asgi: the root of every request task
        return HTTP
    if _under(file, "concurrent/futures/", "threading.py", "anyio/"):
        return QUEUE
    return None


_WAITS = {
    "threading.py": ("Condition.wait", "Event.wait", "Thread.join", "_wait_for_tstate_lock"),
    "concurrent/futures/thread.py": ("_worker",),  # blocked in work_queue.get (C)
    "selectors.py": ("EpollSelector.select", "PollSelector.select", "SelectSelector.select"),
}


def is_wait(frames: Sequence[str]) -> bool:
    """Whether the leaf of a sampled stack is a thread blocked waiting (a sample py-spy took
    as active though the thread burnt no CPU)."""
    if not frames:
        return True
    func, file = parse_frame(frames[-1])
    return any(
        _under(file, suffix) and func in names for suffix, names in _WAITS.items()
    ) or func in ("time.sleep", "sleep")


def classify_stack(frames: Sequence[str]) -> str:
    """The stage of one sampled stack: frames root first, leaf last, each as py-spy writes
    them (`"function (file:line)"`; `thread (...)` and `process ...` entries are skipped).

    The leaf-most frame with a stage of its own decides (logging under a middleware is
    logging, the model's torch calls under run_batch are the model); pydantic frames take
    their caller's side (validation under fastapi's dependencies, else response encoding);
    frames that only carry others (torch, asyncio's loop, thread bootstraps, uvicorn's
    run_asgi) decide only when nothing else does. A blocked leaf is `WAIT`."""
    frames = [f for f in frames if not f.startswith(("thread (", "process "))]
    if is_wait(frames):
        return WAIT
    pending = False
    for frame in reversed(frames):
        stage = _decisive(*parse_frame(frame))
        if stage == _PENDING:
            pending = True
        elif stage:
            if pending and stage != ROUTING:
                return RESPONSE  # a response model built or dumped
            return stage
    if pending:
        return RESPONSE
    for frame in reversed(frames):
        func, file = parse_frame(frame)
        stage = _weak(func, file)
        if stage:
            return stage
        if _decisive(func, file) is None:  # code of no known stage, on a thread or the loop
            return OTHER
    return OTHER


# ----------------------------------------------------------------------------- py-spy output

_THREAD = re.compile(r"^thread \((?P<tid>0x[0-9a-fA-F]+|\d+)\)(?::\s*(?P<name>.*))?$")


@dataclass
class Sample:
    tid: int
    name: str
    frames: list[str]
    count: int


def parse_raw(text: str) -> list[Sample]:
    """py-spy's `--format raw --threads` output: one folded stack per line, then its count."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        tid, name = 0, ""
        for f in frames:
            m = _THREAD.match(f)
            if m:
                tid = int(m.group("tid"), 0)
                name = (m.group("name") or "").strip()
                break
        out.append(Sample(tid, name, frames, int(count)))
    return out


# ----------------------------------------------------------------------------- /proc

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _ticks(stat_path: Path) -> int:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def process_tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return seen


@dataclass
class CpuSnapshot:
    processes: dict[int, int]  # pid -> ticks (all its threads, the exited ones too)
    threads: dict[int, tuple[int, str]]  # tid -> (ticks, comm)


def cpu_snapshot(pids: Iterable[int]) -> CpuSnapshot:
    procs: dict[int, int] = {}
    threads: dict[int, tuple[int, str]] = {}
    for pid in pids:
        try:
            procs[pid] = _ticks(Path(f"/proc/{pid}/stat"))
        except OSError:
            continue
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                comm = (task / "comm").read_text().strip()
                threads[int(task.name)] = (_ticks(task / "stat"), comm)
    return CpuSnapshot(procs, threads)


def tree_cpu_s(pid: int) -> float:
    """The CPU seconds of `pid` and its descendants so far (for bench/peers.py)."""
    return sum(cpu_snapshot(process_tree(pid)).processes.values()) * TICK_S


# ----------------------------------------------------------------------------- attribution


@dataclass
class Attribution:
    stage_s: dict[str, float]
    thread_rows: list[tuple[str, float, int, str]]  # group, cpu s, active samples, top stage
    other_leaves: list[tuple[str, float]]  # leaf frames of `other`, cpu s
    total_s: float


def _group(name: str) -> str:
    return re.sub(r"[_-]?\d+$", "_N", name) if name else "?"


def attribute(samples: list[Sample], before: CpuSnapshot, after: CpuSnapshot) -> Attribution:
    """Each sampled thread's /proc CPU over the window spread over the stages of its active
    samples; unsampled threads as the native residual; exited threads apart."""
    by_tid: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    leaves: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    names: dict[int, str] = {}
    for s in samples:
        stage = classify_stack(s.frames)
        by_tid[s.tid][stage] += s.count
        names[s.tid] = s.name
        if stage == OTHER:
            leaves[s.tid][s.frames[-1]] += s.count
    total = sum(after.processes[p] - before.processes.get(p, 0) for p in after.processes)
    stage_s: dict[str, float] = collections.defaultdict(float)
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    group_stage: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float)
    )
    other_leaves: dict[str, float] = collections.defaultdict(float)
    live = 0
    for tid, (ticks, comm) in after.threads.items():
        cpu = (ticks - before.threads.get(tid, (0, ""))[0]) * TICK_S
        live += ticks - before.threads.get(tid, (0, ""))[0]
        if tid not in by_tid:
            stage_s[MODEL_NATIVE] += cpu
            key = f"native: {comm}"
            groups[key][0] += cpu
            group_stage[key][MODEL_NATIVE] += cpu
            continue
        counts = by_tid[tid]
        active = {k: v for k, v in counts.items() if k != WAIT}
        n = sum(active.values())
        key = _group(names[tid])
        groups[key][0] += cpu
        groups[key][1] += n
        if not n:
            stage_s[QUEUE] += cpu  # woken and put back to sleep, never caught running
            group_stage[key][QUEUE] += cpu
            continue
        for stage, k in active.items():
            stage_s[stage] += cpu * k / n
            group_stage[key][stage] += cpu * k / n
        for leaf, k in leaves[tid].items():
            other_leaves[leaf] += cpu * k / n
    if total > live:
        stage_s[EXITED] += (total - live) * TICK_S
    rows = [(g, cpu, int(n), max(group_stage[g], key=group_stage[g].__getitem__, default="-"))
            for g, (cpu, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])]  # fmt: skip
    top_other = sorted(other_leaves.items(), key=lambda kv: -kv[1])[:5]
    return Attribution(dict(stage_s), rows, top_other, total * TICK_S)


# ----------------------------------------------------------------------------- the run

LUA_RAW = """
local files = {%s}
local bodies = {}
for i, path in ipairs(files) do
  local f = assert(io.open(path, "rb")); bodies[i] = f:read("*a"); f:close()
end
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/classify", {["Content-Type"] = "image/jpeg"},
                    bodies[(n %% #bodies) + 1])
end
"""


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env {p!r}: expected KEY=VALUE")
        env[key] = value
    return env


def py_spy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def start_py_spy(
    spy: str, pid: int, out: Path, rate: int, blocking: bool
) -> subprocess.Popen[bytes] | str:
    """py-spy attached to `pid`, sampling; or why it could not attach."""
    cmd = [spy, "record", "--format", "raw", "--rate", str(rate), "--threads", "--subprocesses",
           "--pid", str(pid), "-o", str(out)]  # fmt: skip
    if not blocking:
        cmd.append("--nonblocking")
    log = out.with_suffix(".log")
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    time.sleep(1.5)  # attach, and the first samples
    if proc.poll() is not None:
        return log.read_text()[-1000:]
    return proc


def main() -> None:
    from bench.common import machine, table
    from bench.launch import Server
    from bench.serve import LUA, serving_home, wrk

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to the server (repeatable), e.g. ALEXNET_PRECISION=fp32")  # fmt: skip
    ap.add_argument("--raw-body", action="store_true",
                    help="POST the JPEG itself (Content-Type: image/jpeg), not a multipart form")  # fmt: skip
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--blocking", action="store_true", help="py-spy pauses the server per sample")
    ap.add_argument("--keep-raw", type=Path, metavar="PATH",
                    help="keep py-spy's folded stacks (flamegraph.pl / speedscope input)")  # fmt: skip
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    spy = py_spy_binary()
    if spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    env = parse_env(args.env)
    with tempfile.TemporaryDirectory() as tmp:
        home, _card, photos, script = serving_home(Path(tmp), LUA)
        if args.raw_body:
            script = script.with_name("raw.lua")
            script.write_text(LUA_RAW % ", ".join(f'"{p}"' for p in photos))
        srv = Server(home, **env).start(timeout_s=600)
        assert srv.proc is not None
        try:
            import httpx

            if args.raw_body:
                r = httpx.post(srv.url + "/v1/classify", content=photos[0].read_bytes(),
                               headers={"Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
                if r.status_code == 415:
                    print("skipped: this server answers 415 to a raw image body on /v1/classify "
                          "(no raw-body support yet)")  # fmt: skip
                    return
                r.raise_for_status()
            info = httpx.get(srv.url + "/v1/models/active", timeout=10).json()
            why = (info.get("precision_check") or {}).get("fallback")
            precision = f"{info.get('precision', '?')}" + (f" ({why})" if why else "")
            wrk(srv.url, script, args.concurrency, 2)  # warm-up
            raw = Path(tmp) / "py-spy.txt"
            started = start_py_spy(spy, srv.proc.pid, raw, args.rate, args.blocking)
            if isinstance(started, str):
                print(f"py-spy could not attach ({started.strip()}); it needs ptrace: run as "
                      "root or with CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE). Per-thread "
                      "/proc CPU only:\n")  # fmt: skip
            pids = process_tree(srv.proc.pid)
            spy_t0 = 0.0 if isinstance(started, str) else tree_cpu_s(started.pid)
            before = cpu_snapshot(pids)
            figures = wrk(srv.url, script, args.concurrency, args.seconds)
            after = cpu_snapshot(pids + [p for p in process_tree(srv.proc.pid) if p not in pids])
            spy_cpu = 0.0
            if not isinstance(started, str):
                spy_cpu = tree_cpu_s(started.pid) - spy_t0
                started.send_signal(signal.SIGINT)
                started.wait(60)
            samples = parse_raw(raw.read_text()) if raw.exists() else []
            if args.keep_raw and raw.exists():
                shutil.copyfile(raw, args.keep_raw)
        finally:
            srv.terminate(30)

    images = figures["requests"] - figures["errors"]
    att = attribute(samples, before, after)
    per = 1000 / max(images, 1)
    rows: list[list[object]] = [[s, f"{att.stage_s[s] * per:.2f}", f"{att.stage_s[s] / att.total_s:.1%}"]
            for s in STAGE_ORDER if att.stage_s.get(s, 0) > 0]  # fmt: skip
    rows.append(["total (server process tree, /proc)", f"{att.total_s * per:.2f}", "100%"])
    body = "raw image/jpeg body" if args.raw_body else "multipart/form-data"
    settings = " ".join(args.env) or "defaults"
    mode = "blocking" if args.blocking else "non-blocking"
    print(f"Machine: {machine()}\nModel: AlexNet, 1000 classes, 224x224; JPEG photos 640x480 as "
          f"{body}; server: {settings}, serving {precision}; wrk -t1 -c{args.concurrency}, {args.seconds} s after a "
          f"2 s warm-up; py-spy {args.rate} Hz, {mode}\n")  # fmt: skip
    print(table(["stage", "CPU ms per image", "share"], rows))
    print(f"\nServed: {images:.0f} images in {args.seconds} s = {figures['ok_rps']:.1f} img/s "
          f"(2xx; wrk: non-2xx {figures['errors']:.0f}); server CPU {att.total_s * per:.1f} ms per "
          f"image ({att.total_s / args.seconds:.2f} cores busy)")  # fmt: skip
    if figures["errors"]:
        print(f"Note: {figures['errors']:.0f} answers were not 2xx (429: the queue-wait bound, "
              "ALEXNET_MAX_QUEUE_WAIT_S); their CPU is in the totals, divided by 2xx images")  # fmt: skip
    print(f"Beside it on the same cores: wrk {figures['cpu_s'] * per:.1f} ms per image, py-spy "
          f"{spy_cpu * per:.1f} ms per image\n")  # fmt: skip
    print("By thread (CPU from /proc; stage: where most of it went)")
    print(table(["thread", "CPU ms per image", "active samples", "main stage"],
                [[g, f"{cpu * per:.2f}", n, st] for g, cpu, n, st in att.thread_rows
                 if cpu > 0 or n]))  # fmt: skip
    if att.other_leaves:
        print("\nLargest leaf frames left in 'other'")
        print(table(["leaf frame", "CPU ms per image"],
                    [[leaf, f"{s * per:.2f}"] for leaf, s in att.other_leaves]))  # fmt: skip


if __name__ == "__main__":
    main()
