"""`alexnet import-torchvision | predict | models` as real subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.io import decode_image as tv_decode
from torchvision.models import AlexNet_Weights

from tests.helpers.cli import run_cli
from tests.helpers.presets import torchvision_v2_preset
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torchvision.models.AlexNet]:
    """torchvision's AlexNet (random weights, fc8 sharpened so top-5 is well separated)
    saved as a .pth the way torchvision ships it."""
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None).eval()
    with torch.no_grad():
        tv.classifier[6].weight.mul_(20)
    path = tmp_path_factory.mktemp("tv") / "alexnet-owt-7be5be79.pth"
    torch.save(tv.state_dict(), path)
    return path, tv


def test_import_torchvision_then_predict_matches_torchvision(
    tmp_path: Path, tv_weights: tuple[Path, torchvision.models.AlexNet], png_photos: list[Path]
) -> None:
    path, tv = tv_weights
    home = tmp_path / "home"
    r = run_cli("import-torchvision", "--weights-file", str(path), home=home)
    assert r.returncode == 0, r.stderr
    assert "(active)" in r.stdout
    card = json.loads(next((home / "models").glob("*/model.json")).read_text())
    assert card["num_classes"] == 1000 and card["labels"][0] == "tench"
    assert (card["image_size"], card["resize_size"]) == (224, 256)
    assert card["source"] == "torchvision"

    photos = png_photos[:4]
    r = run_cli("predict", "active", *map(str, photos), "--json", home=home,
                env={"ALEXNET_PRECISION": "fp32", "ALEXNET_DEVICE": "cpu"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    served = json.loads(r.stdout)
    categories = AlexNet_Weights.IMAGENET1K_V1.meta["categories"]
    preset = torchvision_v2_preset()
    for photo, result in zip(photos, served, strict=True):
        assert result["filename"] == str(photo)  # as given on the command line
        with torch.no_grad():
            probs = torch.softmax(tv(preset(tv_decode(str(photo)))[None]), dim=1)[0]
        top = probs.topk(5)
        assert [p["index"] for p in result["predictions"]] == top.indices.tolist()
        assert [p["label"] for p in result["predictions"]] == [categories[i] for i in top.indices]
        for p, expected in zip(result["predictions"], top.values.tolist(), strict=True):
            assert abs(p["probability"] - expected) < 1e-5


def test_predict_text_output_and_top_k(tmp_path: Path, jpeg_photos: list[Path]) -> None:
    home = tmp_path / "home"
    card = make_version(home / "models", activate=True)
    r = run_cli("predict", card.version, str(jpeg_photos[0]), "--top-k", "3", home=home)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(jpeg_photos[0]) and len(lines) == 4
    assert all("%" in line and "class_" in line for line in lines[1:])


def test_models_list_and_activate(tmp_path: Path) -> None:
    home = tmp_path / "home"
    a = make_version(home / "models", activate=True, metrics={"val_top1": 0.5})
    b = make_version(home / "models", seed=1)
    listed = json.loads(run_cli("models", "list", "--json", home=home).stdout)
    assert listed["active"] == a.version
    assert {v["version"]: v["active"] for v in listed["versions"]} == {
        a.version: True, b.version: False,
    }  # fmt: skip
    r = run_cli("models", "activate", b.version, home=home)
    assert r.returncode == 0 and b.version in r.stdout
    assert (home / "models" / "ACTIVE").read_text().strip() == b.version
    table = run_cli("models", home=home).stdout
    assert f"* {b.version}" in table and "50.0%" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import-torchvision", "--weights-file", "/nonexistent.pth"], "no such file"),
        (["predict", "nope", "x.jpg"], "unknown model version 'nope'"),
        (["models", "activate", "nope"], "unknown model version 'nope'"),
        (["train", "--dataset", "synthetic", "--epochs", "0"], "--epochs"),
        (["predict"], "the following arguments are required"),
    ],
)
def test_errors_are_one_clear_line_and_a_non_zero_exit(
    tmp_path: Path, args: list[str], message: str
) -> None:
    r = run_cli(*args, home=tmp_path / "home")
    assert r.returncode in (1, 2)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr


def test_unreadable_image_is_reported_and_fails(tmp_path: Path, jpeg_photos: list[Path]) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    r = run_cli("predict", "active", str(jpeg_photos[0]), str(bad), "--json", home=home)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert "predictions" in out[0]
    assert out[1]["error"]["code"] == "invalid_image"
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "bad.jpg" in r.stderr
