"""Keeping answers for feedback costs the answers nothing measurable: the real server under
wrk at concurrency 1 and 32, AlexNet with 1000 classes at 224 px and real JPEG photos,
with ALEXNET_FEEDBACK off and on. Every request's body is unique (a counter after the
JPEG's end, which decoders ignore), so with feedback on every answer writes a new blob and
record: the worst case for the writer. Also: how many answers were kept or dropped, and
what POST /v1/feedback itself sustains.

    python bench/feedback.py [--seconds 10] [--rounds 4]     # needs wrk (apt-get install wrk)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, table
from bench.serve import serving_home, start, wrk

# Like bench/serve.py's, with the request number appended after each JPEG (unique bytes).
LUA = """
local files = {%s}
local datas = {}
local boundary = "----alexnetbench"
for i, path in ipairs(files) do
  local f = assert(io.open(path, "rb")); datas[i] = f:read("*a"); f:close()
end
local n = 0
request = function()
  n = n + 1
  local body = "--" .. boundary .. "\\r\\nContent-Disposition: form-data; name=\\"file\\"; filename=\\"p.jpg\\"\\r\\n" ..
    "Content-Type: image/jpeg\\r\\n\\r\\n" .. datas[(n %% #datas) + 1] .. tostring(n) .. tostring(math.random(1e9)) ..
    "\\r\\n--" .. boundary .. "--\\r\\n"
  return wrk.format("POST", "/v1/classify", {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
end
"""

LABEL_LUA = """
local ids = {%s}
local labels = {"class 1", "class 2", "class 3"}
local n = 0
request = function()
  n = n + 1
  local body = '{"prediction_id": "' .. ids[(n %% #ids) + 1] .. '", "label": "' .. labels[(n %% 3) + 1] .. '"}'
  return wrk.format("POST", "/v1/feedback", {["Content-Type"] = "application/json"}, body)
end
"""


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for m in re.finditer(r'^alexnet_feedback_(kept|dropped)_total(\{reason="(\w+)"\})? ([\d.e+]+)$',
                         text, re.M):  # fmt: skip
        out[m.group(3) or m.group(1)] = float(m.group(4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4, help="off/on alternations (noise)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        home, _, _, script = serving_home(Path(tmp), LUA)
        results: dict[str, dict[int, list[dict[str, float]]]] = {"off": {}, "on": {}}
        kept: dict[str, float] = {}
        label_rate = None
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                env = {"ALEXNET_FEEDBACK": "true"} if mode == "on" else {}
                proc, url, _ = start(home, env)
                try:
                    for conc in (1, 32):
                        wrk(url, script, conc, 2)  # warm up
                        results[mode].setdefault(conc, []).append(
                            wrk(url, script, conc, args.seconds)
                        )
                    if mode == "on":
                        kept = counters(url)
                        if label_rate is None:
                            with sqlite3.connect(home / "alexnet.db") as db:
                                ids = [r[0] for r in db.execute(
                                    "SELECT prediction_id FROM feedback LIMIT 500")]  # fmt: skip
                            lscript = Path(tmp) / "label.lua"
                            lscript.write_text(LABEL_LUA % ", ".join(f'"{i}"' for i in ids))
                            label_rate = wrk(url, lscript, 32, args.seconds)
                finally:
                    proc.terminate()
                    proc.wait(30)
        rows = []
        for conc in (1, 32):
            med = {}
            for m in ("off", "on"):
                runs = sorted(results[m][conc], key=lambda r: r["rps"])
                med[m] = statistics.median(r["rps"] for r in runs)
                mid = runs[len(runs) // 2]
                rows.append([f"feedback {m}", conc, f"{med[m]:.1f}",
                             " ".join(f"{r['rps']:.1f}" for r in results[m][conc]),
                             f"{mid['p50']:.1f}", f"{mid['p99']:.1f}",
                             sum(int(r["errors"]) for r in runs)])  # fmt: skip
            rows.append(["on / off", conc, f"{med['on'] / med['off']:.3f}", "", "", "", ""])
        print(machine())
        print(f"{args.rounds} alternating rounds of {args.seconds} s each (a fresh server each); "
              "every upload unique")  # fmt: skip
        print(table(["server", "conc", "median img/s", "each round", "p50 ms", "p99 ms",
                     "non-2xx"], rows))  # fmt: skip
        print(f"kept by the last 'on' server: {kept}")
        if label_rate:
            print(f"POST /v1/feedback at c32: {label_rate['rps']:.0f}/s, p50 "
                  f"{label_rate['p50']:.1f} ms, p99 {label_rate['p99']:.1f} ms, "
                  f"non-2xx {int(label_rate['errors'])}")  # fmt: skip


if __name__ == "__main__":
    main()
