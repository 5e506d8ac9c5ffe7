"""POST /v1/feedback and /admin/feedback through the app in-process: answers kept
(content-addressed, deduplicated), labels checked against the answering version (one no
longer served too), replaced with history, live accuracy with Wilson intervals, metrics,
review, deletion and purge; feedback while it is off; the token; a full disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from model.checkpoint import ModelCard
from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.datasets import shape_images
from tests.helpers.disks import small_tmpfs
from tests.helpers.versions import make_version

TOKEN = "feedback-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = {"Authorization": "Bearer end-user-token"}
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [data for _, data in sorted(shape_images(3, 4).items())]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, ModelCard, ModelCard]]:
    home = tmp_path_factory.mktemp("feedback-home")
    other = make_version(home / "models", labels=["cat", "dog"], seed=1)
    card = make_version(home / "models", activate=True, labels=CLASSES)
    with make_client(home, admin_token=TOKEN, feedback=True, feedback_token="end-user-token",
                     watch_active_s=0, run_jobs=False, holdout_split=0.5) as client:  # fmt: skip
        wait_ready(client)
        yield client, card, other


@pytest.fixture
def client(served: tuple[TestClient, ModelCard, ModelCard]) -> TestClient:
    return served[0]


def classify(client: TestClient, data: bytes, **params: Any) -> dict[str, Any]:
    r = client.post("/v1/classify", files={"file": ("x.png", data)}, params=params)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def send(client: TestClient, pid: str, label: str, headers: dict[str, str] = USER) -> Any:
    return client.post("/v1/feedback", json={"prediction_id": pid, "label": label}, headers=headers)


def test_feedback_is_kept_labelled_replaced_and_counted(
    client: TestClient, images: list[bytes]
) -> None:
    a = classify(client, images[0], top_k=1)
    assert len(a["predictions"]) == 1  # the answer is as asked; the top-5 is kept besides
    b = classify(client, images[0])  # the same bytes: one blob
    predicted = a["predictions"][0]["label"]
    wrong = next(c for c in CLASSES if c != predicted)
    r = send(client, a["prediction_id"], wrong)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == wrong and body["correct"] is False and body["previous_label"] is None
    assert body["split"] in ("train", "holdout") and len(body["predictions"]) == 3
    r = send(client, a["prediction_id"], predicted)
    again = r.json()
    assert again["previous_label"] == wrong and again["correct"] is True
    assert again["split"] == body["split"]  # drawn once, never moved
    assert [h["label"] for h in again["history"]] == [wrong, predicted]
    assert send(client, b["prediction_id"], predicted).json()["split"] == body["split"]

    item = client.get(f"/admin/feedback/{a['prediction_id']}", headers=AUTH).json()
    assert item["label"] == predicted and len(item["history"]) == 2
    img = client.get(item["image_url"], headers=AUTH)
    assert img.status_code == 200 and img.content == images[0]
    assert img.headers["content-type"] == "image/jpeg"  # shape_images writes JPEGs
    home = Path(client.app.state.alexnet.settings.home)  # type: ignore[attr-defined]
    sha = hashlib.sha256(images[0]).hexdigest()
    assert (home / "feedback" / "blobs" / sha[:2] / sha).read_bytes() == images[0]

    summary = client.get("/admin/feedback", headers=AUTH).json()
    assert summary["enabled"] and summary["labelled"] >= 2
    assert summary["per_label"][predicted] >= 2
    v = next(v for v in summary["versions"] if v["version"] == a["model"]["version"])
    assert (
        v["top1"]["correct"] >= 2
        and 0 <= v["top1"]["low"] <= v["top1"]["accuracy"] <= v["top1"]["high"] <= 1
    )
    assert summary["confusion"][0]["count"] >= summary["confusion"][-1]["count"]
    metrics = client.get("/metrics").text
    assert (
        f'alexnet_feedback_labels_total{{outcome="right",version="{a["model"]["version"]}"}}'
        in metrics
    )
    assert "alexnet_feedback_kept_total" in metrics


def test_bad_feedback(client: TestClient, images: list[bytes]) -> None:
    a = classify(client, images[1])
    err = assert_error(send(client, a["prediction_id"], "circel"), 422, "validation_error")
    assert "'circle'" in err["message"] and "GET /v1/models/active" in err["message"]
    assert err["details"]["labels"] == CLASSES  # type: ignore[index]
    err = assert_error(send(client, "0" * 32, "circle"), 404, "not_found")
    assert "expired" in err["message"]
    assert_error(send(client, "not-an-id", "circle"), 422, "validation_error")
    assert_error(client.post("/v1/feedback", json={"prediction_id": a["prediction_id"], "label": "circle",
                                                   "extra": 1}, headers=USER), 422, "validation_error")  # fmt: skip
    big = {"prediction_id": a["prediction_id"], "label": "x" * 8000}
    assert_error(client.post("/v1/feedback", json=big, headers=USER), 413, "payload_too_large")
    assert client.get("/v1/feedback").json() == {"enabled": True, "token_required": True}
    # ALEXNET_FEEDBACK_TOKEN is set here: no token or another one is refused
    assert_error(send(client, a["prediction_id"], "circle", headers={}), 401, "unauthorized")
    assert_error(send(client, a["prediction_id"], "circle", headers=AUTH), 401, "unauthorized")
    # /admin/feedback needs the admin token, not the users' one
    assert_error(client.get("/admin/feedback", headers=USER), 401, "unauthorized")
    assert_error(client.get(f"/admin/feedback/{'0' * 32}", headers=AUTH), 404, "not_found")
    assert_error(client.get(f"/admin/feedback/{'0' * 32}/image", headers=AUTH), 404, "not_found")


def test_jobs_on_feedback_read_a_snapshot(
    served: tuple[TestClient, ModelCard, ModelCard], images: list[bytes]
) -> None:
    client, card, _ = served
    home = Path(client.app.state.alexnet.settings.home)  # type: ignore[attr-defined]
    job = {"dataset": "feedback", "epochs": 1, "batch_size": 4}
    client.post("/admin/feedback/purge", headers=AUTH, json={"older_than_s": 0})
    err = assert_error(client.post("/admin/jobs", headers=AUTH, json=job), 422, "validation_error")
    assert "label more answers" in err["message"]
    for i, data in enumerate(images):
        send(client, classify(client, data)["prediction_id"], CLASSES[i % 3])
    r = client.post("/admin/jobs", headers=AUTH, json=job)
    assert r.status_code == 202, r.text
    cfg = r.json()["config"]
    assert cfg["dataset"].startswith("feedback:job-") and cfg["base"] == card.version
    assert cfg["image_size"] == card.image_size  # the base's, as a fine-tune takes it
    snap = home / "data" / ".feedback" / cfg["dataset"].split(":", 1)[1]
    man = json.loads((snap / "manifest.json").read_text())
    assert man["classes"] == CLASSES and len(man["images"]) == len(images)
    summary = client.get("/admin/feedback", headers=AUTH).json()
    assert sum(1 for im in man["images"] if im[2] == "holdout") == summary["splits"]["holdout"]
    # include_feedback: the dataset stays, the snapshot is added
    r = client.post("/admin/jobs", headers=AUTH, json={"dataset": "synthetic", "epochs": 1,
                                                        "include_feedback": True})  # fmt: skip
    assert r.status_code == 202, r.text
    assert r.json()["config"]["feedback"].startswith("feedback:job-")
    assert r.json()["config"]["dataset"] == "synthetic"
    # the snapshot is the service's to name
    bad = {"dataset": "synthetic", "feedback": "feedback:mine"}
    assert_error(client.post("/admin/jobs", headers=AUTH, json=bad), 422, "validation_error")
    # a snapshot name is the service's to give, as a dataset too
    bad = {"dataset": cfg["dataset"], "base": card.version}
    assert_error(client.post("/admin/jobs", headers=AUTH, json=bad), 422, "validation_error")
    for j in client.get("/admin/jobs", headers=AUTH).json()["jobs"]:
        assert client.delete(f"/admin/jobs/{j['id']}", headers=AUTH).status_code == 200


def test_export_and_stats_from_the_command_line(
    served: tuple[TestClient, ModelCard, ModelCard], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from app.cli import main

    client = served[0]
    home = Path(client.app.state.alexnet.settings.home)  # type: ignore[attr-defined]
    monkeypatch.setenv("ALEXNET_HOME", str(home))
    monkeypatch.setenv("ALEXNET_HOLDOUT_SPLIT", "0.5")
    summary = client.get("/admin/feedback", headers=AUTH).json()
    assert main(["feedback", "export", "--dataset", "from-users", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "from-users" and out["layout"] == "pre_split"
    assert out["holdout"]["from"] == "test folder"  # the feedback holdout, kept as it was
    # every labelled answer of a label with train examples, once per image and label
    assert (
        out["images"] <= summary["labelled"]
        and out["splits"].get("holdout", 0) <= summary["splits"]["holdout"]
    )
    man = client.get("/admin/datasets/from-users", headers=AUTH).json()
    assert set(man["classes"]) <= set(CLASSES) | {"cat", "dog"}
    assert main(["feedback", "export", "--dataset", "from-users"]) == 1  # exists: --replace
    assert "exists" in capsys.readouterr().err
    assert main(["feedback", "stats"]) == 0
    assert "labelled" in capsys.readouterr().out


def test_review_delete_and_purge(client: TestClient, images: list[bytes]) -> None:
    client.post("/admin/feedback/purge", headers=AUTH, json={"older_than_s": 0})
    ids = [classify(client, images[i])["prediction_id"] for i in (3, 4, 5)]
    for pid in ids:
        label = send(client, pid, "square").json()
    page = client.get(
        "/admin/feedback/items", headers=AUTH, params={"label": "square", "limit": 2}
    ).json()
    assert page["total"] >= 3 and len(page["items"]) == 2 and page["limit"] == 2
    nxt = client.get("/admin/feedback/items", headers=AUTH,
                     params={"label": "square", "limit": 2, "offset": 2}).json()  # fmt: skip
    assert not {i["prediction_id"] for i in page["items"]} & {
        i["prediction_id"] for i in nxt["items"]
    }
    wrong = client.get(
        "/admin/feedback/items", headers=AUTH, params={"wrong": "true", "limit": 500}
    ).json()
    assert all(i["label"] != i["predicted"] for i in wrong["items"])
    assert (label["predicted"] != "square") == (
        ids[-1] in {i["prediction_id"] for i in wrong["items"]}
    )
    by_version = client.get("/admin/feedback/items", headers=AUTH,
                            params={"version": label["version"], "limit": 500}).json()  # fmt: skip
    assert all(i["version"] == label["version"] for i in by_version["items"])
    gone = client.delete(f"/admin/feedback/{ids[0]}", headers=AUTH).json()
    assert gone["deleted"] == 1 and gone["freed_bytes"] == len(images[3])
    assert_error(client.get(f"/admin/feedback/{ids[0]}/image", headers=AUTH), 404, "not_found")
    assert_error(send(client, ids[0], "square"), 404, "not_found")  # deleted: unknown now
    assert_error(client.delete(f"/admin/feedback/{ids[0]}", headers=AUTH), 404, "not_found")
    purged = client.post("/admin/feedback/purge", headers=AUTH, json={"older_than_s": 0}).json()
    assert purged["deleted"] >= 2 and purged["freed_bytes"] > 0
    summary = client.get("/admin/feedback", headers=AUTH).json()
    assert summary["kept"] == 0 and summary["bytes"] == 0


def test_a_full_disk_drops_the_kept_copy_not_the_answer(
    tmp_path: Path, images: list[bytes]
) -> None:
    make_version(tmp_path / "models", activate=True, labels=CLASSES)
    with small_tmpfs(tmp_path / "feedback", "64k"), \
            make_client(tmp_path, admin_token=TOKEN, feedback=True) as client:  # fmt: skip
        wait_ready(client)
        big = images * 2  # far more than 64 KiB together
        answers = [classify(client, data + bytes(i)) for i, data in enumerate(big)]
        assert all(len(a["predictions"]) == 3 for a in answers)
        keeper = client.app.state.alexnet.keeper  # type: ignore[attr-defined]
        for a in answers:
            keeper.wait_written(a["prediction_id"], 10.0)
        metrics = client.get("/metrics").text
        line = next(
            m
            for m in metrics.splitlines()
            if m.startswith('alexnet_feedback_dropped_total{reason="disk_full"}')
        )
        assert float(line.split()[-1]) > 0
        assert classify(client, images[0])["predictions"]  # still answering


def test_a_version_no_longer_served_still_takes_its_labels(
    served: tuple[TestClient, ModelCard, ModelCard], images: list[bytes]
) -> None:
    client, card, other = served
    a = classify(client, images[2])
    # (the module's last test: the other version stays served)
    assert client.post(f"/admin/models/{other.version}/activate", headers=AUTH).status_code == 200
    b = classify(client, images[2])
    assert b["model"]["version"] == other.version
    r = send(client, a["prediction_id"], "triangle")  # the old version's label: accepted
    assert r.status_code == 200 and r.json()["version"] == card.version
    assert_error(send(client, b["prediction_id"], "triangle"), 422, "validation_error")
    assert send(client, b["prediction_id"], "dog").status_code == 200
