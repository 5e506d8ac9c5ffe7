"""Shared fixtures: real photos, small model versions, isolated ALEXNET_HOME. No network."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.common import photo_paths
from model.checkpoint import ModelCard, save_version, write_active
from model.network import build_model
from model.transforms import Preprocessing

REPO = Path(__file__).resolve().parent.parent


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


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ALEXNET_HOME for this test (settings read it from the environment)."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("ALEXNET_HOME", str(h))
    return h


def make_version(
    models_dir: Path,
    *,
    num_classes: int = 10,
    image_size: int = 64,
    seed: int = 0,
    arch: str = "alexnet",
    activate: bool = False,
    sharpen: float = 20.0,
    **kw: object,
) -> ModelCard:
    """A small randomly initialised version; fc8 scaled by `sharpen` so its softmax is
    peaked like a trained model's (top-k ties would make comparisons meaningless)."""
    torch.manual_seed(seed)
    net = build_model(arch, num_classes=num_classes)
    with torch.no_grad():
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(sharpen)
    card = save_version(
        models_dir,
        net,
        arch=arch,
        labels=[f"class_{i}" for i in range(num_classes)],
        pre=Preprocessing.for_size(image_size),
        **kw,  # type: ignore[arg-type]
    )
    if activate:
        write_active(models_dir, card.version)
    return card


@pytest.fixture
def version_factory() -> Callable[..., ModelCard]:
    return make_version


def run_cli(
    *args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `python -m app.cli ...` as a real subprocess with ALEXNET_HOME=home."""
    full_env = {**os.environ, "ALEXNET_HOME": str(home), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
