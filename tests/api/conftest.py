from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from model.checkpoint import ModelCard
from tests.helpers.api import make_client, wait_ready
from tests.helpers.versions import make_version


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
