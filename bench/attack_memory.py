"""Memory after an attack: the real server's resident size before, at the peak of and 60 s
after a bounded run of the hostile clients of docs/security.md.

1. Warm the server with ordinary traffic (single uploads and full batches), leave it idle
   for --settle-seconds (what an idle server holds, trimmed or not) and take its resident
   size: "before".
2. Run the attacks one after another, each bounded: header floods, half-sent heads held to
   the header deadline, endless chunk extensions, pipelined requests never read, oversized
   and numerous file parts, large uploads at once, then a burst of full batches.
3. Sample the resident size every second for --after-seconds with the server idle, and
   report the peak (VmHWM) and the last sample: "after".

    python bench/attack_memory.py                  # AlexNet 1000 classes @224, 60 s after
    python bench/attack_memory.py --small          # a 10-class 64 px model (quick)
    python bench/attack_memory.py --json out.json  # also write the figures as JSON

Any ALEXNET_* or MALLOC_* variable in the environment reaches the server, so a setting's
effect can be measured: `MALLOC_ARENA_MAX=8 python bench/attack_memory.py`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import jpeg_photos, machine, table
from bench.launch import Server, proc_status_kb
from bench.overload import make_home

BOUNDARY = "alexnetattack"


@dataclass
class Step:
    attack: str
    seconds: float
    outcomes: dict[str, int]  # first status line seen (or what ended the connection) -> count
    rss_mb: float  # resident size when the step ended
    peak_mb: float  # VmHWM when the step ended


@dataclass
class Report:
    machine: str
    model: str
    env: dict[str, str]
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    after_seconds: float
    steps: list[Step] = field(default_factory=list)
    after: list[tuple[float, float]] = field(default_factory=list)  # (s, MB) while idle


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def status_of(sock: socket.socket, timeout_s: float) -> str:
    """The status code of the first answer on `sock`, or what ended the wait."""
    sock.settimeout(timeout_s)
    try:
        head = sock.recv(64)
    except TimeoutError:
        return "no answer"
    except OSError as exc:
        return type(exc).__name__
    if not head:
        return "closed"
    parts = head.split(b" ", 2)
    return parts[1].decode("latin-1") if len(parts) > 1 else "garbled"


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def send_until_answered(sock: socket.socket, first: bytes, chunk: bytes, total: int) -> None:
    """Send `first`, then `chunk` until `total` bytes or until the server stops reading."""
    try:
        sock.sendall(first)
        sent = len(first)
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server answered and closed: what a limit looks like from here


def in_threads(n: int, work: Callable[[int], str]) -> Counter[str]:
    out: Counter[str] = Counter()
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            result = work(i)
        except OSError as exc:
            result = type(exc).__name__
        with lock:
            out[result] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def multipart(parts: list[tuple[str, str, bytes]]) -> bytes:
    body = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{fn}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, fn, data in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body  # fmt: skip


class Attacks:
    """Each method runs one bounded attack and returns its outcomes."""

    def __init__(self, port: int, photo: bytes, big_jpeg: bytes, header_timeout_s: float) -> None:
        self.port, self.photo, self.big_jpeg = port, photo, big_jpeg
        self.wait_s = header_timeout_s + 15  # long enough for any deadline to answer

    def _each(self, n: int, first: bytes, chunk: bytes = b"", total: int = 0,
              wait_s: float | None = None) -> Counter[str]:  # fmt: skip
        """`n` connections at once, each sending `first` (then `chunk` up to `total` bytes,
        or until the server stops reading) and reporting the first status it gets."""

        def one(_: int) -> str:
            with connect(self.port) as s:
                send_until_answered(s, first, chunk, total)
                return status_of(s, self.wait_s if wait_s is None else wait_s)

        return in_threads(n, one)

    def header_flood(self) -> Counter[str]:
        """100 connections, each a header line of up to 10 MiB that never ends."""
        return self._each(100, b"GET /healthz HTTP/1.1\r\nX-A: ", b"a" * 65536, 10 << 20)

    def many_header_lines(self) -> Counter[str]:
        """100 connections with 100 header lines of 1 KB each."""
        lines = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1000) for i in range(100))
        return self._each(100, b"GET /healthz HTTP/1.1\r\nHost: b\r\n" + lines + b"\r\n")

    def held_heads(self) -> Counter[str]:
        """300 connections each holding 60 KiB of a head it never finishes, until the
        header deadline (408) or the bound on connections sending headers (429)."""

        def one(i: int) -> str:
            with connect(self.port) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nX-H: " + b"h" * (60 << 10))
                return status_of(s, self.wait_s)

        return in_threads(300, one)

    def chunk_extensions(self) -> Counter[str]:
        """20 connections sending a chunked body of 20 MiB of chunk-extension bytes."""
        head = (f"POST /v1/classify HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n1;").encode()  # fmt: skip
        return self._each(20, head, b"e" * 65536, 20 << 20)

    def pipelined_unread(self) -> Counter[str]:
        """10 connections writing 400 pipelined uploads each, reading nothing for 3 s."""
        one_request = post("/v1/classify", multipart([("file", "p.jpg", self.photo)]))

        def one(_: int) -> str:
            with connect(self.port) as s:
                s.settimeout(3)
                try:
                    s.sendall(one_request * 400)
                except OSError as exc:  # the send buffer filled: the server stopped reading
                    return "send blocked" if isinstance(exc, TimeoutError) else type(exc).__name__
                return "sent, unread"

        return in_threads(10, one)

    def oversized_parts(self) -> Counter[str]:
        """20 batches, each with a 20 MiB file part (the limit is 10 MiB)."""
        body = post("/v1/classify/batch",
                    multipart([("files", "a.jpg", self.photo), ("files", "big.jpg", b"\xff" * (20 << 20))]))  # fmt: skip
        return self._each(20, body)

    def thousand_files(self) -> Counter[str]:
        """20 batches of 1,000 files."""
        body = post("/v1/classify/batch",
                    multipart([("files", f"{i}.jpg", self.photo[:200]) for i in range(1000)]))  # fmt: skip
        return self._each(20, body)

    def large_uploads(self) -> Counter[str]:
        """40 uploads at once of a real 8-9 MiB JPEG (under the per-file limit)."""
        body = post("/v1/classify", multipart([("file", "big.jpg", self.big_jpeg)]))
        return self._each(40, body, wait_s=120)

    def batch_burst(self) -> Counter[str]:
        """Ordinary traffic at its largest: 16 clients each sending 4 full batches (32)."""
        body = post("/v1/classify/batch",
                    multipart([("files", f"{i}.jpg", self.photo) for i in range(32)]))  # fmt: skip

        def one(_: int) -> str:
            out = []
            for _ in range(4):
                with connect(self.port) as s:
                    s.sendall(body)
                    out.append(status_of(s, 120))
            return "/".join(sorted(set(out)))

        return in_threads(16, one)


def big_noise_jpeg(target: int = 8 << 20) -> bytes:
    """A real JPEG of noise just over `target` bytes: the most a single upload can cost."""
    side = int((target / 1.2) ** 0.5)  # noise at quality 95: ~1.2 bytes a pixel
    while True:
        img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        if buf.tell() >= target:
            return buf.getvalue()
        side += 100


def mappings(pid: int) -> dict[str, int]:
    """Resident kB per mapping of /proc/PID/smaps, keyed by start address and name."""
    out: dict[str, int] = {}
    key = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if "-" in first[0] and not first[0].endswith(":"):
            # by start address: a heap that grows keeps its start
            key = f"{first[0].split('-')[0]} {first[5] if len(first) > 5 else '[anon]'}"
        elif first[0] == "Rss:":
            out[key] = int(first[1])
    return out


def mapping_growth(before: dict[str, int], after: dict[str, int], n: int = 12) -> str:
    """The mappings whose resident size grew most, as a table."""
    rows = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in before.keys() | after.keys()),
                  reverse=True)[:n]  # fmt: skip
    return table(["grew kB", "before kB", "after kB", "mapping"],
                 [[d, before.get(k, 0), after.get(k, 0), k] for d, k in rows])  # fmt: skip


def warm(url: str, photo: bytes) -> None:
    """Ordinary traffic, every batch size the server will see."""
    with httpx.Client(timeout=120) as c:
        for _ in range(20):
            assert c.post(url + "/v1/classify", files={"file": ("p.jpg", photo)}).status_code == 200
        for n in (1, 8, 32, 32, 32):
            files = [("files", (f"{i}.jpg", photo)) for i in range(n)]
            assert c.post(url + "/v1/classify/batch", files=files).status_code == 200


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small", action="store_true", help="a 10-class 64 px model (quick)")
    ap.add_argument("--after-seconds", type=float, default=60)
    ap.add_argument(
        "--settle-seconds",
        type=float,
        default=10,
        help="idle time between the warm-up and 'before'",
    )
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument(
        "--mappings",
        action="store_true",
        help="also list the memory mappings that grew most (/proc/PID/smaps)",
    )
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith(("ALEXNET_", "MALLOC_"))}
    header_timeout_s = float(env.get("ALEXNET_HEADER_TIMEOUT_S", "10"))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = make_home(tmp, args.small)
        photo = jpeg_photos(tmp / "photos", (640, 480))[0].read_bytes()
        attacks = Attacks(0, photo, big_noise_jpeg(), header_timeout_s)
        with Server(tmp / "home") as srv:
            assert srv.proc is not None
            pid = srv.proc.pid
            attacks.port = srv.port
            warm(srv.url, photo)
            time.sleep(args.settle_seconds)
            before, maps_before = rss_mb(pid), mappings(pid)
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            report = Report(machine(), model, env, before, 0.0, 0.0, args.after_seconds)
            for name in ("header_flood", "many_header_lines", "held_heads", "chunk_extensions",
                         "pipelined_unread", "oversized_parts", "thousand_files",
                         "large_uploads", "batch_burst"):  # fmt: skip
                t0 = time.monotonic()
                outcomes = getattr(attacks, name)()
                report.steps.append(Step(name, time.monotonic() - t0, dict(outcomes), rss_mb(pid),
                                         proc_status_kb(pid, "VmHWM") / 1024))  # fmt: skip
                print(
                    f"{name}: {dict(outcomes)}  RSS {report.steps[-1].rss_mb:.0f} MB",
                    file=sys.stderr,
                )
            report.rss_peak_mb = proc_status_kb(pid, "VmHWM") / 1024
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < args.after_seconds:
                report.after.append((round(elapsed, 1), rss_mb(pid)))
                time.sleep(1.0)
            report.rss_after_mb, maps_after = rss_mb(pid), mappings(pid)
            assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
            with httpx.Client(timeout=60) as c:  # still serving after all that
                r = c.post(srv.url + "/v1/classify", files={"file": ("p.jpg", photo)})
                assert r.status_code == 200, r.text
    print(f"Machine: {report.machine}\nModel: {report.model}")
    print(f"Server environment: {' '.join(f'{k}={v}' for k, v in env.items()) or '(defaults)'}\n")
    print(table(["attack", "seconds", "outcomes", "RSS after it MB", "peak so far MB"],
                [[s.attack, f"{s.seconds:.1f}", " ".join(f"{k}: {v}" for k, v in sorted(s.outcomes.items())),
                  f"{s.rss_mb:.0f}", f"{s.peak_mb:.0f}"] for s in report.steps]))  # fmt: skip
    print()

    def at(t: float) -> float:  # the idle sample nearest t seconds after the attacks
        return min(report.after, key=lambda s: abs(s[0] - t))[1]

    last = report.after[-1][0]
    marks = sorted({t for t in (0.0, 10.0, 30.0) if t < last} | {last})
    print(table(["RSS before MB", "RSS peak MB", *(f"{t:.0f} s after MB" for t in marks),
                 "after vs before"],
                [[f"{before:.0f}", f"{report.rss_peak_mb:.0f}", *(f"{at(t):.0f}" for t in marks),
                  f"{(report.rss_after_mb / before - 1) * 100:+.1f}%"]]))  # fmt: skip
    if args.mappings:
        print("\n" + mapping_growth(maps_before, maps_after))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
