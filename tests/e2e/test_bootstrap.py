"""The embedded default offline: no model, no ImageNet weights reachable -> a synthetic
training job through the admin runner, activated when done; not ready until then."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from model.checkpoint import read_active
from tests.helpers.server import Server

pytestmark = pytest.mark.e2e

TOKEN = "bootstrap-token"


def test_offline_first_start_trains_the_builtin_model(
    home: Path, tmp_path: Path, jpeg_photos: list[Path]
) -> None:
    env = {
        "ALEXNET_BOOTSTRAP": "auto",
        "ALEXNET_LOG_LEVEL": "info",  # the first start's story is told at info
        "ALEXNET_ADMIN_TOKEN": TOKEN,
        # A smaller recipe than the default, to keep the suite short.
        "ALEXNET_BOOTSTRAP_DATASET": "synthetic:300",
        "ALEXNET_BOOTSTRAP_EPOCHS": "1",
        # Offline, for real: no cached weights, and every download is refused at once.
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    with Server(home, **env).start(wait_ready=False) as srv:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        job: dict[str, object] = {}
        deadline = time.monotonic() + 60
        while not job and time.monotonic() < deadline:
            jobs = httpx.get(srv.url + "/admin/jobs", headers=auth, timeout=10).json()["jobs"]
            job = jobs[0] if jobs else {}
            time.sleep(0.2)
        assert job and job["source"] == "bootstrap", job
        assert job["config"]["dataset"] == "synthetic:300"  # type: ignore[index]
        not_ready = httpx.get(srv.url + "/readyz", timeout=10)
        if not_ready.status_code == 503:  # (unless it already finished)
            err = not_ready.json()["error"]
            assert err["code"] == "model_not_ready" and int(not_ready.headers["retry-after"]) >= 1
            assert err["details"]["bootstrap_job"] == job["id"]
            assert "synthetic" in err["message"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if httpx.get(srv.url + "/readyz", timeout=10).status_code == 200:
                break
            time.sleep(0.5)
        done = httpx.get(f"{srv.url}/admin/jobs/{job['id']}", headers=auth, timeout=10).json()
        assert done["status"] == "succeeded" and done["activated"], done
        assert read_active(home / "models") == done["result_version"]
        photo = jpeg_photos[0]
        r = httpx.post(srv.url + "/v1/classify", timeout=30,
                       files={"file": (photo.name, photo.read_bytes())})  # fmt: skip
        assert r.status_code == 200
        assert r.json()["model"]["version"] == done["result_version"]
        assert r.json()["predictions"][0]["label"] in {"circle", "triangle", "square", "star",
            "cross", "ring", "crescent", "stripes", "checkerboard", "dots"}  # fmt: skip
        # The log says what happened, in words, and nothing misleading.
        log = srv.log.read_text()
        version = done["result_version"]
        assert "no model version to serve" in log and "ALEXNET_BOOTSTRAP=auto" in log, log
        assert "ImageNet weights unavailable" in log
        assert f"training the built-in model offline as job {job['id']}" in log
        assert f"job {job['id']}: epoch 1/1" in log
        [served] = [ln for ln in log.splitlines() if f"serving version {version} (" in ln]
        assert " on " in served and ("bf16" in served or "fp32" in served), served
        assert "--weights-file" not in log.replace("import-torchvision --weights-file", "")
        assert "Downloading" not in log and "Traceback" not in log
    # A restart serves it at once (no second bootstrap job) and says what it serves.
    with Server(home, **env) as srv:
        jobs = httpx.get(srv.url + "/admin/jobs", headers=auth, timeout=10).json()["jobs"]
        assert len(jobs) == 1
        assert srv.log.read_text().count(f"serving version {version}") == 2
