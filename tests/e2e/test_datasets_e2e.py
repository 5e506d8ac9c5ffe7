"""Your data in, through a real server: upload a zip of class folders, fine-tune from the
served version with each `freeze` mode, and read each promotion decision (both holdout
accuracies, the holdout size, the p-value); two uploads of one name racing; the server
killed while an upload streams in and while it is being extracted."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from model.checkpoint import load_version, read_card
from model.fine_tune import head_names
from model.network import build_model
from tests.helpers.datasets import shape_images, zip_bytes
from tests.helpers.jobs import AUTH, TOKEN, api, finished, wait_job
from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e

CLASSES = ["circle", "square", "triangle"]
ZIP = {**AUTH, "Content-Type": "application/zip"}
ENV = {"ALEXNET_ADMIN_TOKEN": TOKEN, "ALEXNET_JOB_THREADS": "1", "ALEXNET_WATCH_ACTIVE_S": "0"}
FINE_TUNE = {"dataset": "imagefolder:shapes", "base": "active", "epochs": 1, "batch_size": 16,
             "workers": 0, "precision": "fp32", "lr": 0.005, "activate": "if_better"}  # fmt: skip


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "data").glob(".tmp-*"))


def test_upload_fine_tune_each_freeze_mode_and_judge_it_on_the_holdout(home: Path) -> None:
    first = make_version(home / "models", labels=CLASSES, image_size=64, activate=True)
    with Server(home, **ENV) as srv:
        body = zip_bytes(shape_images(3, 14, prefix="shapes/"))
        r = httpx.post(srv.url + "/admin/datasets/shapes", content=body, headers=ZIP, timeout=60)
        assert r.status_code == 201, r.text
        dataset = r.json()
        assert dataset["splits"] == {"trainval": 36, "holdout": 6}

        # Two uploads of one name at once: one wins, the other is 409
        codes: list[int] = []

        def upload() -> None:
            codes.append(httpx.post(srv.url + "/admin/datasets/race", content=body,
                                    headers=ZIP, timeout=60).status_code)  # fmt: skip

        threads = [threading.Thread(target=upload) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [201, 409] and leftovers(home) == []

        for freeze in ("all-but-head", "features", "none"):
            served = api(srv, "GET", "/v1/models/active").json()["version"]
            job = api(srv, "POST", "/admin/jobs", json={**FINE_TUNE, "freeze": freeze}).json()
            assert job["config"]["base"] == served, job
            done = wait_job(srv, job["id"], finished, timeout_s=300)
            assert done["status"] == "succeeded", api(
                srv, "GET", f"/admin/jobs/{job['id']}/log"
            ).text
            p = done["promotion"]
            assert p["holdout_size"] == 6 and p["dataset"] == "imagefolder:shapes"
            assert (
                p["served"]["version"] == served
                and p["candidate"]["version"] == done["result_version"]
            )
            assert 0 <= p["candidate"]["top1"] <= 1 and 0 <= p["served"]["top1"] <= 1
            assert 0 < p["p_value"] <= 1 and p["alpha"] == 0.05
            better = p["candidate"]["top1"] > p["served"]["top1"] and p["p_value"] < 0.05
            assert done["activated"] is better and p["decision"] == ("activated" if better
                                                                     else "not_activated")  # fmt: skip
            text = done["activation"]
            assert f"{p['candidate']['top1']:.4f} vs {p['served']['top1']:.4f}" in text, text
            assert "on 6 images" in text and f"p={p['p_value']:.4g}" in text
            # the version records its base, its dataset's hash and how it was tuned
            card = read_card(home / "models" / done["result_version"])
            assert card.parent == served and card.dataset_hash == dataset["hash"]
            assert card.train_config and card.train_config["freeze"] == freeze
            if freeze == "features":  # the conv layers are the base's, the rest learnt
                after, _ = load_version(home / "models" / card.version)
                before, _ = load_version(home / "models" / served)
                a, b = after.state_dict(), before.state_dict()
                assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("features."))
                head = head_names(build_model("alexnet", num_classes=3))
                assert not any(torch.equal(a[k], b[k]) for k in head)
        # the served version was judged on the same frozen holdout on demand, too
        active = api(srv, "GET", "/v1/models/active").json()["version"]
        r = api(srv, "POST", f"/admin/models/{active}/evaluate",
                json={"dataset": "imagefolder:shapes", "split": "holdout"})  # fmt: skip
        assert r.status_code == 200 and r.json()["count"] == 6, r.text
        assert first.version in {
            c["version"] for c in api(srv, "GET", "/v1/models").json()["versions"]
        }


def _wait_for(pred: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise AssertionError("never happened")


def test_a_server_killed_during_an_upload_leaves_no_partial_dataset(home: Path) -> None:
    make_version(home / "models", labels=CLASSES, image_size=64, activate=True)
    data = home / "data"
    body = zip_bytes(shape_images(3, 120, size=96))
    # 1. killed while the body streams in
    srv = Server(home, **ENV).start()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    head = (f"POST /admin/datasets/killed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/zip\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body[: len(body) // 2])
    _wait_for(lambda: any(p.stat().st_size > 0 for p in data.glob(".tmp-upload-*")))
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    sock.close()
    assert not (data / "killed").exists()
    # 2. killed while the archive is being extracted
    srv = Server(home, **ENV).start()
    assert leftovers(home) == [], "the restart removes what the killed upload left"
    done = threading.Event()

    def upload() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(srv.url + "/admin/datasets/killed", content=body, headers=ZIP, timeout=60)
        done.set()

    threading.Thread(target=upload, daemon=True).start()
    _wait_for(lambda: any(data.glob(".tmp-import-killed-*/**/*.png")) or done.is_set())
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    if not done.is_set():  # (an import faster than the poll has nothing half-done to check)
        assert not (data / "killed").exists()
    with Server(home, **ENV) as srv:
        assert leftovers(home) == []
        names = [d["name"] for d in api(srv, "GET", "/admin/datasets").json()["datasets"]]
        assert names in ([], ["killed"])
        if names:  # whole, when it finished before the kill
            assert api(srv, "GET", "/admin/datasets/killed").json()["images"] == 360
