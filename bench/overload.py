"""Sustained overload: the real server offered twice its measured capacity for two minutes.

1. Measure capacity: 32 clients in a closed loop (each sends its next request when the
   last is answered) for --capacity-seconds; capacity = answers/s.
2. Offer --factor x capacity in an open loop (requests leave on a fixed schedule, whatever
   the server does) for --seconds.
3. Report what was accepted and refused (429 + Retry-After), latency of accepted requests
   per 10-second window, resident memory before, at peak and after, and how long until a
   lone request is served as fast as before the load.

    python bench/overload.py                      # 2 minutes at 2x, AlexNet 1000 classes @224
    python bench/overload.py --seconds 10 --small # a quick look (10-class model @64)
    python bench/overload.py --json out.json      # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import jpeg_photos, machine, table
from bench.launch import Server, proc_status_kb
from model.checkpoint import save_version, write_active
from model.network import build_model
from model.pretrained import IMAGENET_PRE
from model.transforms import Preprocessing

BOUNDARY = "alexnetoverload"


@dataclass
class Answer:
    sent_at: float  # seconds since the open loop began
    status: int | str  # HTTP status, or the exception that replaced the answer
    latency_s: float  # from the scheduled send time to the end of the answer
    retry_after: str | None = None
    lag_s: float = 0.0  # how late the generator sent it


@dataclass
class Report:
    machine: str
    model: str
    capacity_rps: float
    offered_rps: float
    seconds: float
    sent: int
    answers: int
    statuses: dict[str, int]
    retry_after_on_every_429: bool
    accepted_p50_ms: float
    accepted_p99_ms: float
    accepted_max_ms: float
    idle_p50_ms: float
    idle_paced_p90_ms: float  # the recovery probe's baseline
    after_load_statuses: dict[str, int]  # the recovery probes' answers
    lag_p99_ms: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    recovery_s: float
    windows: list[dict[str, float]] = field(default_factory=list)


def request(data: bytes) -> bytes:
    """A whole POST /v1/classify request, built once."""
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()  # fmt: skip
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Pool:
    """A minimal HTTP/1.1 client over keep-alive connections: a Python load generator
    must spend far less CPU per request than the server, and httpx spends too much to
    offer hundreds of requests a second on the 2 cores it shares with the server."""

    MAX_IDLE_S = 2.0  # well under uvicorn's 5 s keep-alive: never send on a closing connection

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[float, tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = []

    def _take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        now = time.monotonic()
        while self.idle:
            since, conn = self.idle.pop()
            if now - since < self.MAX_IDLE_S:
                return conn
            conn[1].close()
        return None

    async def post(self, payload: bytes) -> tuple[int | str, str | None]:
        conn = self._take()
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", self.port)
            reader, writer = conn
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (h.partition(":") for h in lines[1:] if h)}  # fmt: skip
            await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if conn is not None:
                conn[1].close()
            return type(exc).__name__, None
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((time.monotonic(), conn))
        return int(lines[0].split()[1]), headers.get("retry-after")

    def close(self) -> None:
        for _, (_, writer) in self.idle:
            writer.close()


async def closed_loop(port: int, bodies: list[bytes], clients: int, seconds: float) -> float:
    """Answers per second with `clients` clients each waiting for its answer."""
    done = 0
    end = time.monotonic() + seconds
    pool = Pool(port)

    async def client(i: int) -> None:
        nonlocal done
        k = i
        while time.monotonic() < end:
            status, _ = await pool.post(bodies[k % len(bodies)])
            done += status == 200
            k += clients

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    pool.close()
    return done / (time.monotonic() - t0)


PROBE_PAUSE_S = 0.05  # between the requests of the idle baseline and of the recovery probe


async def sequential(port: int, payload: bytes, n: int, pause_s: float = 0.0) -> list[float]:
    """Latencies of `n` requests one after another, `pause_s` apart."""
    out = []
    pool = Pool(port)
    for _ in range(n):
        t = time.perf_counter()
        status, _ = await pool.post(payload)
        if status == 200:
            out.append(time.perf_counter() - t)
        if pause_s:
            await asyncio.sleep(pause_s)
    pool.close()
    return out


async def sample_rss(
    pid: int, into: list[tuple[float, float]], t0: float, stop: asyncio.Event
) -> None:
    """(seconds since t0, resident MB) every second until `stop`."""
    while not stop.is_set():
        into.append((time.monotonic() - t0, proc_status_kb(pid, "VmRSS") / 1024))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def open_loop(port: int, bodies: list[bytes], rate: float, seconds: float,
                    pid: int, rss: list[tuple[float, float]]) -> list[Answer]:  # fmt: skip
    """Send at `rate` per second on a fixed schedule, never waiting for answers. Latency
    counts from the scheduled send time, so a generator that falls behind shows up in it
    (and in `lag_p99_ms`) instead of hiding the server's queueing."""
    answers: list[Answer] = []
    pool = Pool(port)
    t0 = time.monotonic()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, rss, t0, stop))

    async def one(i: int, at: float) -> None:
        lag = time.monotonic() - (t0 + at)
        status, retry = await pool.post(bodies[i % len(bodies)])
        answers.append(Answer(at, status, time.monotonic() - (t0 + at), retry, lag))

    tasks = []
    for i in range(int(rate * seconds)):
        at = i / rate
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, at)))
    await asyncio.gather(*tasks)
    stop.set()
    await sampler
    pool.close()
    return answers


async def recovery(
    port: int, payload: bytes, normal_s: float, statuses: list[int], limit_s: float = 60
) -> float:
    """Seconds after the load until three requests in a row, `PROBE_PAUSE_S` apart, are
    answered within 1.5x `normal_s`: the idle server's p90 measured the same way before the
    load. (Like with like: on some CPUs a request after a pause takes 1.5-2x one sent back
    to back, overload or not, so a back-to-back baseline would never be met.)"""
    t0 = time.monotonic()
    good = 0
    pool = Pool(port)
    try:
        while time.monotonic() - t0 < limit_s:
            t = time.perf_counter()
            status, _ = await pool.post(payload)
            statuses.append(status)
            good = good + 1 if status == 200 and time.perf_counter() - t <= 1.5 * normal_s else 0
            if good == 3:
                return time.monotonic() - t0
            await asyncio.sleep(PROBE_PAUSE_S)
    finally:
        pool.close()
    return float("inf")


def windows(answers: list[Answer], rss: list[tuple[float, float]], seconds: float,
            width: float = 10.0) -> list[dict[str, float]]:  # fmt: skip
    rows = []
    start = 0.0
    while start < seconds:
        w = [a for a in answers if start <= a.sent_at < start + width]
        ok = [a.latency_s for a in w if a.status == 200]
        mem = [mb for t, mb in rss if start <= t < start + width]
        rows.append({"from_s": start, "sent": len(w), "ok": len(ok),
                     "refused_429": sum(a.status == 429 for a in w),
                     "p50_ms": pct(ok, 0.5) * 1000, "p99_ms": pct(ok, 0.99) * 1000,
                     "rss_max_mb": max(mem, default=float("nan"))})  # fmt: skip
        start += width
    return rows


def make_home(tmp: Path, small: bool) -> str:
    torch.manual_seed(0)
    if small:
        net = build_model("alexnet", num_classes=10)
        pre, labels, desc = (
            Preprocessing.for_size(64),
            [f"c{i}" for i in range(10)],
            "10 classes @64",
        )
    else:
        net = build_model("alexnet", num_classes=1000)
        pre, labels, desc = IMAGENET_PRE, [f"class {i}" for i in range(1000)], "1000 classes @224"
    card = save_version(tmp / "home" / "models", net, arch="alexnet", labels=labels, pre=pre)
    write_active(tmp / "home" / "models", card.version)
    return f"AlexNet, {desc} (random weights), JPEG photos 640x480"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--capacity-seconds", type=float, default=15)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--small", action="store_true", help="a 10-class 64 px model (quick)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = make_home(tmp, args.small)
        bodies = [request(p.read_bytes()) for p in jpeg_photos(tmp / "photos", (640, 480))]
        with Server(tmp / "home") as srv:
            assert srv.proc is not None
            pid, port = srv.proc.pid, srv.port
            asyncio.run(closed_loop(port, bodies, 32, 3))  # warm-up: every batch size
            idle = asyncio.run(sequential(port, bodies[0], 20))
            idle_paced = asyncio.run(sequential(port, bodies[0], 20, PROBE_PAUSE_S))
            capacity = asyncio.run(closed_loop(port, bodies, 32, args.capacity_seconds))
            rss_before = proc_status_kb(pid, "VmRSS") / 1024
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            rate = capacity * args.factor
            rss: list[tuple[float, float]] = []
            answers = asyncio.run(open_loop(port, bodies, rate, args.seconds, pid, rss))
            rss_peak = proc_status_kb(pid, "VmHWM") / 1024
            idle_p50 = pct(idle, 0.5)
            after: list[int] = []
            recovered = asyncio.run(recovery(port, bodies[0], pct(idle_paced, 0.9), after))
            rss_after = proc_status_kb(pid, "VmRSS") / 1024
    ok = [a.latency_s for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 429]
    report = Report(
        machine=machine(), model=model, capacity_rps=capacity, offered_rps=rate,
        seconds=args.seconds, sent=int(rate * args.seconds), answers=len(answers),
        statuses={str(k): v for k, v in sorted(Counter(a.status for a in answers).items(), key=str)},
        retry_after_on_every_429=all(a.retry_after and int(a.retry_after) >= 1 for a in refused),
        accepted_p50_ms=pct(ok, 0.5) * 1000, accepted_p99_ms=pct(ok, 0.99) * 1000,
        accepted_max_ms=max(ok, default=float("nan")) * 1000, idle_p50_ms=idle_p50 * 1000,
        idle_paced_p90_ms=pct(idle_paced, 0.9) * 1000,
        after_load_statuses={str(k): v for k, v in Counter(after).items()},
        lag_p99_ms=pct([a.lag_s for a in answers], 0.99) * 1000,
        rss_before_mb=rss_before, rss_peak_mb=rss_peak, rss_after_mb=rss_after,
        recovery_s=recovered, windows=windows(answers, rss, args.seconds),
    )  # fmt: skip
    print(f"Machine: {report.machine}\nModel: {report.model}\n")
    print(table(["capacity (closed loop, 32 clients)", "offered (open loop)", "duration"],
                [[f"{capacity:.1f} req/s", f"{rate:.1f} req/s ({args.factor:g}x)",
                  f"{args.seconds:g} s"]]))  # fmt: skip
    print()
    print(table(["sent", "answered", "statuses", "429 with Retry-After", "accepted p50 ms",
                 "accepted p99 ms", "accepted max ms", "idle p50 ms", "send lag p99 ms"],
                [[report.sent, report.answers, " ".join(f"{k}: {v}" for k, v in report.statuses.items()),
                  "all" if report.retry_after_on_every_429 else "NOT ALL",
                  f"{report.accepted_p50_ms:.0f}", f"{report.accepted_p99_ms:.0f}",
                  f"{report.accepted_max_ms:.0f}", f"{report.idle_p50_ms:.0f}",
                  f"{report.lag_p99_ms:.0f}"]]))  # fmt: skip
    print()
    print(table(["window", "sent", "200", "429", "p50 ms", "p99 ms", "RSS max MB"],
                [[f"{w['from_s']:.0f}-{w['from_s'] + 10:.0f} s", w["sent"], w["ok"],
                  w["refused_429"], f"{w['p50_ms']:.0f}", f"{w['p99_ms']:.0f}",
                  f"{w['rss_max_mb']:.0f}"] for w in report.windows]))  # fmt: skip
    print()
    print(table(["RSS before MB", "RSS peak MB", "RSS after MB", "idle p90 ms, 50 ms apart",
                 "back to idle latency"],
                [[f"{rss_before:.0f}", f"{rss_peak:.0f}", f"{rss_after:.0f}",
                  f"{report.idle_paced_p90_ms:.0f}", f"{recovered:.1f} s"]]))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    try:
        import uvloop  # a faster event loop for the generator, where installed

        uvloop.install()
    except ImportError:
        pass
    main()
