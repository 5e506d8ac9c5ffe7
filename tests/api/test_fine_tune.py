"""Fine-tuning through the admin API: `base` names the version a job starts from
(`active` is resolved when the job is created, so the record says what it really used);
the base's image size and arch apply unless given; an unknown base is a 422."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.versions import make_version

TOKEN = "fine-tune-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(home: Path) -> Iterator[TestClient]:
    make_version(home / "models", activate=True, image_size=96)
    with make_client(home, admin_token=TOKEN, run_jobs=False, watch_active_s=0) as c:
        wait_ready(c)
        yield c


def test_base_active_is_resolved_and_its_image_size_kept(client: TestClient) -> None:
    served = client.get("/v1/models").json()["serving"]
    r = client.post("/admin/jobs", headers=AUTH, json={"dataset": "synthetic", "base": "active"})
    assert r.status_code == 202, r.text
    config = r.json()["config"]
    assert config["base"] == served and config["image_size"] == 96 and config["arch"] == "alexnet"
    # an explicit image size wins
    r = client.post("/admin/jobs", headers=AUTH,
                    json={"dataset": "synthetic", "base": served, "image_size": 128})  # fmt: skip
    assert r.status_code == 202 and r.json()["config"]["image_size"] == 128
    # from scratch: no base
    r = client.post("/admin/jobs", headers=AUTH, json={"dataset": "synthetic"})
    assert r.json()["config"]["base"] is None and r.json()["config"]["image_size"] == 224


@pytest.mark.parametrize("base", ["nope", "../models", "a/b"])
def test_an_unknown_base_is_422(client: TestClient, base: str) -> None:
    r = client.post("/admin/jobs", headers=AUTH, json={"dataset": "synthetic", "base": base})
    err = assert_error(r, 422, "validation_error")
    assert "base" in str(err["message"]) or "base" in str(err["details"])


def test_freeze_and_base_lr_scale_are_job_options(client: TestClient) -> None:
    r = client.post("/admin/jobs", headers=AUTH, json={
        "dataset": "synthetic", "base": "active", "freeze": "all-but-head", "base_lr_scale": 0.1})  # fmt: skip
    assert r.status_code == 202, r.text
    config = r.json()["config"]
    assert config["freeze"] == "all-but-head" and config["base_lr_scale"] == 0.1
    for bad in ({"freeze": "features"}, {"base_lr_scale": 0.5}):  # without a base
        err = assert_error(client.post("/admin/jobs", headers=AUTH,
                                       json={"dataset": "synthetic", **bad}), 422, "validation_error")  # fmt: skip
        assert "give base" in str(err)
    for bad in ({"freeze": "conv"}, {"base_lr_scale": 0}, {"base_lr_scale": 2}):
        r = client.post("/admin/jobs", headers=AUTH, json={"dataset": "synthetic",
                                                             "base": "active", **bad})  # fmt: skip
        assert_error(r, 422, "validation_error")
