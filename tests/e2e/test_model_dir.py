"""ALEXNET_MODEL_DIR with a real `alexnet serve`, as KServe runs it: one version folder,
read-only (/mnt/models), serves real photos with the version's own answers; a write route
is refused; nothing is written, in the folder (its files, mtimes and hashes before and
after: under root, chmod does not stop writes) or under ALEXNET_HOME, through a shutdown."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from model.checkpoint import ModelCard, load_version
from model.device import Placement
from model.images import DecodeLimits
from model.predictor import Predictor
from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "model-dir-e2e-token"


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under `folder`: (mode, mtime_ns, sha256 of a file's bytes)."""
    out = {}
    for p in sorted([folder, *folder.rglob("*")]):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_mtime_ns, digest)
    return out


def set_writable(folder: Path, writable: bool) -> None:
    w = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for p in [folder, *folder.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~w)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, ModelCard, Path, dict[str, tuple[int, int, str]]]]:
    root = tmp_path_factory.mktemp("kserve")
    card = make_version(root / "store", probes=True, labels=[f"thing {i}" for i in range(10)])
    folder = root / "mnt" / "models"  # what KServe's storage initializer fills
    shutil.copytree(root / "store" / card.version, folder)
    set_writable(folder, False)
    before = snapshot(folder)
    home = root / "home"
    home.mkdir()  # (the launcher writes its log here; the server writes nothing)
    srv = Server(home, ALEXNET_MODEL_DIR=str(folder), ALEXNET_ADMIN_TOKEN=TOKEN,
                 ALEXNET_PRECISION="fp32", ALEXNET_WATCH_ACTIVE_S="0.2",
                 ALEXNET_BOOTSTRAP="auto", ALEXNET_MODEL_NAME="alexnet-isvc")  # fmt: skip
    try:
        yield srv.start(), card, folder, before
    finally:
        srv.__exit__(None, None, None)
        set_writable(folder, True)


def test_a_real_photo_gets_the_versions_own_answer(
    served: tuple[Server, ModelCard, Path, dict[str, tuple[int, int, str]]],
    jpeg_photos: list[Path],
) -> None:
    srv, card, folder, _ = served
    data = jpeg_photos[0].read_bytes()
    r = httpx.post(srv.url + "/v1/classify", files={"file": ("photo.jpg", data)}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] == card.version
    net, same = load_version(folder)
    predictor = Predictor(net, same, Placement(torch.device("cpu"), "fp32"))
    (row,) = predictor.rows(predictor.decode(data, DecodeLimits()).unsqueeze(0), 5)
    got = [(p["index"], p["label"], p["probability"]) for p in body["predictions"]]
    assert [(i, card.labels[i]) for i, _ in row] == [(i, label) for i, label, _ in got]
    for (_, want), (_, _, p) in zip(row, got, strict=True):
        assert abs(want - p) < 1e-5


def test_the_served_version_is_described(
    served: tuple[Server, ModelCard, Path, dict[str, tuple[int, int, str]]],
) -> None:
    srv, card, folder, _ = served
    active = httpx.get(srv.url + "/v1/models/active", timeout=10).json()
    assert active["version"] == card.version and active["model_dir"] == str(folder)
    assert active["sha256"] == card.sha256 and active["labels"] == card.labels
    listed = httpx.get(srv.url + "/v1/models", timeout=10).json()
    assert listed["active"] == listed["serving"] == card.version
    assert [v["version"] for v in listed["versions"]] == [card.version]


def test_the_open_inference_protocol_serves_it_under_the_inferenceservices_name(
    served: tuple[Server, ModelCard, Path, dict[str, tuple[int, int, str]]],
    jpeg_photos: list[Path],
) -> None:
    """As KServe routes to it: /v2/models/{the InferenceService's name} (ALEXNET_MODEL_NAME),
    the same answer as /v1/classify."""
    srv, card, _, _ = served
    meta = httpx.get(srv.url + "/v2/models/alexnet-isvc", timeout=10).json()
    assert meta["name"] == "alexnet-isvc" and meta["versions"] == [card.version]
    assert httpx.get(srv.url + "/v2/models/alexnet-isvc/ready", timeout=10).status_code == 200
    assert httpx.get(srv.url + "/v2/models/alexnet", timeout=10).status_code == 404
    data = jpeg_photos[1].read_bytes()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(data).decode()]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 5}}]}  # fmt: skip
    r = httpx.post(srv.url + "/v2/models/alexnet-isvc/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    top = [int(e.split(":")[1]) for e in r.json()["outputs"][0]["data"]]
    v1 = httpx.post(srv.url + "/v1/classify", files={"file": ("p.jpg", data)}, timeout=30).json()
    assert top == [p["index"] for p in v1["predictions"]]
    assert "prediction_ids" in r.json()["parameters"]  # (feedback is off: nothing is kept)


def test_write_routes_are_refused(
    served: tuple[Server, ModelCard, Path, dict[str, tuple[int, int, str]]],
) -> None:
    srv, card, folder, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, path, kw in [
        ("POST", "/admin/jobs", {"json": {"dataset": "synthetic", "epochs": 1}}),
        ("POST", f"/admin/models/{card.version}/activate", {}),
        ("DELETE", f"/admin/models/{card.version}", {}),
    ]:
        r = httpx.request(method, srv.url + path, headers=auth, timeout=10, **kw)  # type: ignore[arg-type]
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "read_only"
        assert r.json()["error"]["details"] == {"model_dir": str(folder)}


def test_nothing_is_written_through_a_shutdown(
    served: tuple[Server, ModelCard, Path, dict[str, tuple[int, int, str]]],
) -> None:
    srv, _, folder, before = served
    time.sleep(1.0)  # a few ticks of the ACTIVE watcher, if one ran (none does)
    # (uvicorn re-raises the SIGTERM it handled once shutdown is complete)
    assert srv.terminate() in (0, -signal.SIGTERM)
    assert sorted(os.listdir(srv.home)) == ["server.log"]  # no ACTIVE, servers/, alexnet.db
    assert snapshot(folder) == before
    assert "Traceback" not in srv.log.read_text()
