"""ALEXNET_MODEL_DIR in-process: one version folder served read-only (KServe's /mnt/models):
the models routes describe it, every admin route and feedback are refused, nothing under
ALEXNET_HOME is created, and a folder that does not load leaves the service up, not ready,
saying why."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model.checkpoint import CARD_FILE, ModelCard
from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.versions import make_version

TOKEN = "model-dir-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    """A version's folder copied out of its store, under a name that is no version name."""
    root = tmp_path_factory.mktemp("model-dir")
    card = make_version(root / "store", probes=True)
    folder = root / "mnt-models"
    shutil.copytree(root / "store" / card.version, folder)
    return folder, card


@pytest.fixture(scope="module")
def served(
    version: tuple[Path, ModelCard], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Path]]:
    folder, _ = version
    home = tmp_path_factory.mktemp("unused") / "home"  # never created
    with make_client(home, model_dir=folder, admin_token=TOKEN, feedback=True,
                     precision="fp32") as client:  # fmt: skip
        wait_ready(client)
        yield client, home


def test_the_models_routes_describe_the_folder(
    served: tuple[TestClient, Path], version: tuple[Path, ModelCard]
) -> None:
    client, _ = served
    folder, card = version
    assert client.get("/readyz").json()["version"] == card.version
    listed = client.get("/v1/models").json()
    assert listed["model_dir"] == str(folder)
    assert listed["active"] == listed["serving"] == card.version
    (entry,) = listed["versions"]
    assert entry["version"] == card.version and entry["active"] and entry["serving"]
    assert entry["size_bytes"] > 0
    active = client.get("/v1/models/active").json()
    assert active["version"] == card.version and active["model_dir"] == str(folder)
    assert active["labels"] == card.labels
    assert active["precision_check"]["parity"]["fp32"]["passed"] is True
    assert_error(client.get(f"/v1/models/{card.version}/reliability.png"), 404, "not_found")
    assert_error(client.get("/v1/models/20200101-000000-0000/reliability.png"), 404,
                 "not_found")  # fmt: skip


@pytest.mark.parametrize(("method", "path", "kw"), [
    ("POST", "/admin/jobs", {"json": {"dataset": "synthetic", "epochs": 1}}),
    ("GET", "/admin/jobs", {}),
    ("POST", "/admin/models/{version}/activate", {}),
    ("DELETE", "/admin/models/{version}", {}),
    ("POST", "/admin/models/{version}/evaluate", {"json": {"dataset": "synthetic"}}),
    ("POST", "/admin/datasets/flowers", {"content": b"PK\x05\x06" + bytes(18)}),
    ("GET", "/admin/datasets", {}),
    ("GET", "/admin/feedback", {}),
])  # fmt: skip
def test_admin_routes_answer_read_only(
    served: tuple[TestClient, Path], version: tuple[Path, ModelCard], method: str, path: str,
    kw: dict[str, object],
) -> None:  # fmt: skip
    client, _ = served
    url = path.format(version=version[1].version)
    err = assert_error(client.request(method, url, headers=AUTH, **kw), 503, "read_only")  # type: ignore[arg-type]
    assert "ALEXNET_MODEL_DIR" in str(err["message"])
    assert err["details"] == {"model_dir": str(version[0])}
    # the token is checked first: a stranger learns nothing
    assert_error(client.request(method, url, **kw), 401, "unauthorized")  # type: ignore[arg-type]


def test_feedback_is_off(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    assert client.get("/v1/feedback").json()["enabled"] is False  # (ALEXNET_FEEDBACK=true)
    r = client.post("/v1/feedback", json={"prediction_id": "0" * 32, "label": "class_0"})
    assert "ALEXNET_MODEL_DIR" in str(assert_error(r, 503, "feedback_disabled")["message"])


def test_nothing_is_made_under_the_home(served: tuple[TestClient, Path]) -> None:
    client, home = served
    assert client.get("/metrics").status_code == 200
    assert not home.exists()


def _not_ready_reason(folder: Path, tmp: Path) -> str:
    with make_client(tmp / "home", model_dir=folder) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = client.get("/readyz")
            if r.json()["error"]["details"]["status"] == "no_model":
                break
            time.sleep(0.05)
        assert client.get("/healthz").status_code == 200  # up, and not ready
        err = assert_error(client.get("/readyz"), 503, "model_not_ready")
        assert_error(client.post("/v1/classify", content=b"x",
                                 headers={"Content-Type": "image/jpeg"}), 503, "model_not_ready")  # fmt: skip
        assert client.get("/v1/models").json()["versions"] == []
    assert not (tmp / "home").exists()
    return str(err["message"])


def test_a_missing_folder_is_not_ready_and_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "nowhere"
    message = _not_ready_reason(folder, tmp_path)
    assert f"ALEXNET_MODEL_DIR {folder} does not load" in message
    assert f"{folder / CARD_FILE}: missing" in message


def test_a_corrupt_model_json_is_not_ready_and_says_so(
    version: tuple[Path, ModelCard], tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    shutil.copytree(version[0], folder)
    (folder / CARD_FILE).write_text('{"format_version": 1, "arch": ')
    message = _not_ready_reason(folder, tmp_path)
    assert f"ALEXNET_MODEL_DIR {folder} does not load" in message
    assert "unreadable JSON" in message
