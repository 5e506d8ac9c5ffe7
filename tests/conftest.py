"""Shared fixtures: real photos, small model versions, isolated ALEXNET_HOME. No network."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from model.checkpoint import ModelCard
from tests.helpers.photos import photo_paths
from tests.helpers.versions import make_version


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real public-domain photos (scikit-image's and matplotlib's sample data) as RGB
    JPEG and PNG files."""
    out = tmp_path_factory.mktemp("photos")
    sources = photo_paths()
    if len(sources) < 4:
        pytest.fail("real sample photos not found: install the dev extra (scikit-image)")
    for src in sources:
        img = Image.open(src).convert("RGB")
        img.save(out / f"{src.stem}.jpg", quality=90)
        img.save(out / f"{src.stem}.png")
    return out


@pytest.fixture(scope="session")
def jpeg_photos(photo_dir: Path) -> list[Path]:
    return sorted(photo_dir.glob("*.jpg"))


@pytest.fixture(scope="session")
def png_photos(photo_dir: Path) -> list[Path]:
    return sorted(photo_dir.glob("*.png"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ALEXNET_HOME for this test (settings read it from the environment)."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("ALEXNET_HOME", str(h))
    return h


@pytest.fixture
def version_factory() -> Callable[..., ModelCard]:
    return make_version
