"""The feedback loop through a real server: a version trained to confuse two classes is
served, users label its answers, live accuracy falls below its own validation accuracy, a
job fine-tunes on the labelled traffic and is promoted on the feedback holdout with its
numbers, and the new version answers those images right. On the way: 10,000 feedback posts
in a burst, an answer deleted while a job reads it, and the server killed while it keeps
answers: nothing orphaned or dangling after the restart, every label and its split kept."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model.checkpoint import read_card
from tests.helpers.datasets import write_tree
from tests.helpers.jobs import TOKEN, api, finished, wait_job
from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e

CLASSES = ["blue", "green", "red"]  # sorted: an imagefolder's class order
TINTS = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 50, 40)}
ENV = {"ALEXNET_ADMIN_TOKEN": TOKEN, "ALEXNET_JOB_THREADS": "1", "ALEXNET_WATCH_ACTIVE_S": "0",
       "ALEXNET_FEEDBACK": "true", "ALEXNET_HOLDOUT_SPLIT": "0.5"}  # fmt: skip
PROBE = {"freeze": "all-but-head", "image_size": 64, "batch_size": 8, "workers": 0,
         "precision": "fp32", "lr": 0.2, "dropout": 0.0, "augment": False}  # fmt: skip


def tinted(per_class: int, seed: int) -> dict[str, bytes]:
    """{"<colour>/<n>.png|jpg": bytes}: noisy images of one dominant colour each, with a
    grey shape on top (a random AlexNet's features tell the colours apart, so a linear
    probe on them learns in seconds)."""
    rng = np.random.default_rng(seed)
    out = {}
    for colour, tint in TINTS.items():
        for k in range(per_class):
            arr = np.clip(rng.normal(tint, 35, (72, 72, 3)), 0, 255).astype(np.uint8)
            x, y, r = (int(v) for v in rng.integers(12, 60, 3))
            arr[max(0, y - r // 3) : y + r // 3, max(0, x - r // 3) : x + r // 3] = 128
            fmt, ext = ("PNG", "png") if k % 2 else ("JPEG", "jpg")
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format=fmt)
            out[f"{colour}/{k:03d}.{ext}"] = buf.getvalue()
    return out


def truth(name: str) -> str:
    return name.split("/", 1)[0]


def classify(srv: Server, data: bytes) -> dict[str, Any]:
    r = httpx.post(srv.url + "/v1/classify", files={"file": ("x", data)}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def top1(answer: dict[str, Any]) -> str:
    return answer["predictions"][0]["label"]  # type: ignore[no-any-return]


def feedback(srv: Server, pid: str, label: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/feedback", json={"prediction_id": pid, "label": label},
                      timeout=30)  # fmt: skip


async def burst(port: int, ids: list[str], n: int, conns: int = 32) -> dict[int, int]:
    """`n` feedback posts over `conns` keep-alive connections at once (raw HTTP/1.1: a
    light client, so the server is what is measured): statuses counted."""
    codes: dict[int, int] = {}

    async def conn(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(k, n, conns):
                body = json.dumps({"prediction_id": ids[i % len(ids)], "label": CLASSES[i % 3]})
                writer.write(f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                             f"{body}".encode())  # fmt: skip
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(int(h.split(":", 1)[1]) for h in head.split("\r\n")
                              if h.lower().startswith("content-length:"))  # fmt: skip
                await reader.readexactly(length)
                status = int(head.split(" ", 2)[1])
                codes[status] = codes.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(conn(k) for k in range(conns)))
    return codes


def test_the_loop_from_confused_answers_to_a_promoted_fix(home: Path) -> None:
    # A version trained on purpose to confuse green and red: a linear probe on a
    # fixed random AlexNet, on a dataset whose green and red folders are swapped.
    base = make_version(home / "models", labels=CLASSES, image_size=64, seed=3)
    swap = {"blue": "blue", "green": "red", "red": "green"}
    write_tree(home / "data" / "swapped", {f"{swap[truth(k)]}/{k.split('/', 1)[1]}": v
                                           for k, v in tinted(24, seed=11).items()})  # fmt: skip
    with Server(home, **ENV) as srv:
        job = api(srv, "POST", "/admin/jobs", json={
            **PROBE, "dataset": "imagefolder:swapped", "base": base.version, "epochs": 3,
            "activate": "always"}).json()  # fmt: skip
        job = wait_job(srv, job["id"], finished, timeout_s=300)
        assert job["status"] == "succeeded", job
        confused = read_card(home / "models" / job["result_version"])
        val_top1 = confused.metrics["val_top1"]
        assert val_top1 >= 0.6, confused.metrics  # it learned its (swapped) labels

        # Traffic: shapes it has never seen; every answer labelled with the truth
        traffic = sorted(tinted(15, seed=21).items())
        answers = {name: classify(srv, data) for name, data in traffic}
        assert {a["model"]["version"] for a in answers.values()} == {confused.version}
        for name, a in answers.items():
            r = feedback(srv, a["prediction_id"], truth(name))
            assert r.status_code == 200, r.text
        before = sum(top1(a) == truth(n) for n, a in answers.items()) / len(answers)
        live = api(srv, "GET", "/admin/feedback").json()
        (v0,) = [v for v in live["versions"] if v["version"] == confused.version]
        assert v0["labelled"] == len(traffic)
        assert v0["top1"]["accuracy"] == pytest.approx(before)
        assert v0["top1"]["high"] < val_top1  # below its own validation accuracy, beyond doubt
        assert live["confusion"][0]["predicted"] != live["confusion"][0]["label"] or \
            live["confusion"][0]["predicted"] == "blue"  # fmt: skip

        # 10,000 feedback posts at once: bounded, never a 5xx, classify still answers
        ids = [a["prediction_id"] for a in answers.values()]
        got: dict[str, Any] = {}

        def during() -> None:
            got["answer"] = classify(srv, traffic[0][1])

        t = threading.Thread(target=during)
        t.start()
        codes = asyncio.run(burst(srv.port, ids, 10_000))
        t.join(60)
        assert sum(codes.values()) == 10_000 and set(codes) <= {200, 429}, codes
        assert got["answer"]["predictions"]
        # the burst relabelled them: put the truth back (the last label wins)
        for name, a in answers.items():
            assert feedback(srv, a["prediction_id"], truth(name)).status_code == 200
        items = api(srv, "GET", "/admin/feedback/items", params={"limit": 500}).json()["items"]
        splits = {i["prediction_id"]: i["split"] for i in items}

        # Retrain from feedback: a fine-tune of the served version on the labelled traffic
        job = api(srv, "POST", "/admin/jobs", json={
            **PROBE, "dataset": "feedback", "epochs": 6, "activate": "if_better"}).json()  # fmt: skip
        assert job["config"]["base"] == confused.version, job
        snapshot = home / "data" / ".feedback" / job["config"]["dataset"].split(":", 1)[1]
        # an answer deleted while the job reads it: the job keeps its copy
        train_one = next(i for i in items if i["split"] == "train")
        r = api(srv, "DELETE", f"/admin/feedback/{train_one['prediction_id']}")
        assert r.status_code == 200, r.text
        man = json.loads((snapshot / "manifest.json").read_text())
        assert len(man["images"]) == sum(1 for s in splits.values() if s)  # the labelled ones
        assert all((snapshot / im[0]).is_file() for im in man["images"])
        job = wait_job(srv, job["id"], finished, timeout_s=300)
        assert job["status"] == "succeeded", job
        promo = job["promotion"]
        assert job["activated"], job["activation"]
        # decided on the feedback holdout; the served version's own dataset (with its
        # swapped labels, which the users contradicted) reported beside it
        assert set(promo["holdouts"]) == {"feedback", "served_dataset"}
        served_data = promo["holdouts"]["served_dataset"]
        assert served_data["dataset"] == "imagefolder:swapped" and not served_data["decided_on"]
        assert served_data["candidate_top1"] < served_data["served_top1"]
        fb = promo["holdouts"]["feedback"]
        assert fb["size"] == sum(1 for s in splits.values() if s == "holdout")
        assert fb["candidate_top1"] > fb["served_top1"] and promo["p_value"] < 0.05
        assert "feedback holdout" in job["activation"]
        assert not snapshot.exists()  # gone with the job
        assert api(srv, "GET", f"/admin/feedback/{train_one['prediction_id']}").status_code == 404

        fixed = read_card(home / "models" / job["result_version"])
        assert fixed.parent == confused.version
        again = {name: classify(srv, data) for name, data in traffic}
        assert {a["model"]["version"] for a in again.values()} == {fixed.version}
        after = sum(top1(a) == truth(n) for n, a in again.items()) / len(again)
        assert after > before and after >= 0.75, (before, after)
        held = [n for n, a in answers.items() if splits[a["prediction_id"]] == "holdout"]
        # The server killed while it keeps answers (blobs and records in flight)
        kill_under_load(srv, [d for _, d in traffic])

    with Server(home, **ENV) as srv:
        with sqlite3.connect(home / "alexnet.db") as con:
            records = {r[0] for r in con.execute("SELECT DISTINCT sha256 FROM feedback")}
            known = dict(con.execute("SELECT sha256, size FROM feedback_blobs").fetchall())
        blobs = {p.name: p.stat().st_size for p in (home / "feedback" / "blobs").glob("*/*")}
        assert records and records == set(blobs) == set(known)  # no orphan, nothing dangling
        assert all(known[s] == n for s, n in blobs.items())
        for sha in list(blobs)[:5]:
            data = (home / "feedback" / "blobs" / sha[:2] / sha).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha
        assert not list((home / "feedback" / "tmp").glob("*"))
        # every label and its split survive the restart
        items = api(
            srv, "GET", "/admin/feedback/items", params={"labelled": "true", "limit": 500}
        ).json()["items"]
        want = {a["prediction_id"]: (truth(n), splits[a["prediction_id"]]) for n, a in answers.items()
                if a["prediction_id"] != train_one["prediction_id"]}  # fmt: skip
        assert {i["prediction_id"]: (i["label"], i["split"]) for i in items} == want
        assert classify(srv, traffic[0][1])["model"]["version"] == fixed.version
        print(
            f"loop: val top-1 {val_top1:.3f}; {len(answers)} labels; live top-1 {before:.3f} "
            f"{v0['top1']} -> {after:.3f}; "
            f"holdout {fb['size']} ({len(held)}): {fb['served_top1']:.3f} -> "
            f"{fb['candidate_top1']:.3f}, p={promo['p_value']:.3g}; burst {codes}"
        )


def kill_under_load(srv: Server, images: list[bytes]) -> None:
    """SIGKILL the server while four clients keep it classifying unique uploads (so its
    writer is between blobs and records), once at least 20 more answers are recorded."""
    stop = threading.Event()

    def load() -> None:
        i = 0
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    c.post(srv.url + "/v1/classify",
                           files={"file": ("x", images[i % len(images)] + b"%d" % i)})  # fmt: skip
                except httpx.HTTPError:
                    return
                i += 1

    db = srv.home / "alexnet.db"
    with sqlite3.connect(db) as con:
        start = con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sqlite3.connect(db) as con:
                if con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] >= start + 20:
                    break
            time.sleep(0.05)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
    finally:
        stop.set()
        for w in workers:
            w.join(10)
