from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.checkpoint import ModelCard
from tests.conftest import make_version


def wait_ready(client: TestClient, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/readyz').json()}")


def make_client(home: Path, **overrides: Any) -> TestClient:
    settings = Settings(**{"home": home, "bootstrap": "none", **overrides})
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, ModelCard]]:
    """A ready app serving a small 10-class version (module-scoped: loading takes ~1 s)."""
    home = tmp_path_factory.mktemp("home")
    card = make_version(home / "models", activate=True, metrics={"val_top1": 0.5})
    with make_client(home, max_upload_bytes=2 * 1024 * 1024, max_files=4,
                     max_image_pixels=4_000_000) as client:  # fmt: skip
        wait_ready(client)
        yield client, card


@pytest.fixture
def client(served: tuple[TestClient, ModelCard]) -> TestClient:
    return served[0]


@pytest.fixture
def card(served: tuple[TestClient, ModelCard]) -> ModelCard:
    return served[1]
