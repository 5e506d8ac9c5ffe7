"""`alexnet predict` on folders and paths, its errors and --top-k; `alexnet evaluate`
--split, per-class accuracy and the confusion matrix. Real `python -m app.cli` processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model import synthetic
from model.checkpoint import ModelCard, save_version
from model.network import build_model
from model.transforms import Preprocessing
from tests.helpers.cli import run_cli
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e


def _noise_png(path: Path, seed: int, side: int = 72) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)


def _labelled_version(home: Path, labels: list[str], **kw: Any) -> ModelCard:
    """A random 64 px version with these labels (no training: tests assert structure)."""
    torch.manual_seed(0)
    net = build_model("alexnet", num_classes=len(labels))
    return save_version(home / "models", net, arch="alexnet", labels=labels,
                        pre=Preprocessing.for_size(64), **kw)  # fmt: skip


def _imagefolder(home: Path, name: str, classes: list[str], per_class: int) -> None:
    for c, cls in enumerate(classes):
        for i in range(per_class):
            _noise_png(home / "data" / name / cls / f"{i}.png", seed=100 * c + i)


# ----------------------------------------------------------------------------- predict


def test_predict_accepts_folders_recursively_and_prints_paths_as_given(
    tmp_path: Path, jpeg_photos: list[Path], png_photos: list[Path]
) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True)
    photos = tmp_path / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(png_photos[0], photos / "b.png")
    shutil.copy(jpeg_photos[0], photos / "sub" / "a.JPG")  # suffixes in any case
    shutil.copy(png_photos[1], photos / "sub" / "deeper" / "c.png")
    (photos / "notes.txt").write_text("not an image, not picked up")
    (photos / ".thumbs").mkdir()
    shutil.copy(png_photos[2], photos / ".thumbs" / "hidden.png")  # hidden: left out
    # The folder spelled with "./" and a trailing slash: kept as given, not normalised.
    folder_arg = f"{tmp_path}/./photos/"
    single = str(jpeg_photos[1])
    expected = [
        f"{tmp_path}/./photos/b.png",
        f"{tmp_path}/./photos/sub/a.JPG",
        f"{tmp_path}/./photos/sub/deeper/c.png",
        single,
    ]

    r = run_cli("predict", "active", folder_arg, single, "--json", home=home)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["filename"] for x in results] == expected
    for x in results:
        assert len(x["predictions"]) == 5
        assert set(x["predictions"][0]) == {"label", "index", "probability"}

    r = run_cli("predict", "active", folder_arg, single, "--top-k", "1", home=home)
    assert r.returncode == 0, r.stderr
    names = [line for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert names == expected


def test_each_skipped_image_is_reported_once_on_stderr(
    tmp_path: Path, jpeg_photos: list[Path]
) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    missing = tmp_path / "missing.jpg"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(jpeg_photos[0]), str(bad), str(missing), str(empty)]

    r = run_cli("predict", "active", *args, home=home)
    assert r.returncode == 1
    assert r.stdout.splitlines()[0] == str(jpeg_photos[0])
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 3, r.stderr
    for path, line in zip([bad, missing, empty], errors, strict=True):
        assert line.startswith(f"alexnet: skipped {path}: ")
        assert (r.stdout + r.stderr).count(path.name) == 1, (r.stdout, r.stderr)
    assert errors[1].endswith("No such file or directory")
    assert "no image files" in errors[2]

    r = run_cli("predict", "active", *args, "--json", home=home)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert "predictions" in out[0]
    assert [x["error"]["code"] for x in out[1:]] == ["invalid_image", "unreadable_file",
                                                     "no_images"]  # fmt: skip
    assert len(r.stderr.strip().splitlines()) == 3
    assert r.stderr.count(missing.name) == 1


def test_top_k_defaults_to_every_class_of_a_small_model_and_refuses_more(
    tmp_path: Path, jpeg_photos: list[Path]
) -> None:
    home = tmp_path / "home"
    card = make_version(home / "models", num_classes=3, activate=True)
    r = run_cli("predict", card.version, str(jpeg_photos[0]), "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)[0]["predictions"]) == 3

    r = run_cli("predict", card.version, str(jpeg_photos[0]), "--top-k", "4", home=home)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "alexnet: error: --top-k must be between 1 and the model's 3 classes, got 4"
    ]


# ----------------------------------------------------------------------------- evaluate


def _check_report(ev: dict[str, Any], labels: list[str]) -> None:
    assert ev["labels"] == labels
    matrix = ev["confusion_matrix"]
    assert len(matrix) == len(labels) and all(len(row) == len(labels) for row in matrix)
    assert sum(map(sum, matrix)) == ev["count"]
    assert [c["label"] for c in ev["per_class"]] == labels
    for i, (c, row) in enumerate(zip(ev["per_class"], matrix, strict=True)):
        assert (c["index"], c["count"], c["correct"]) == (i, sum(row), row[i])
        assert c["accuracy"] == (c["correct"] / c["count"] if c["count"] else None)
    assert sum(c["correct"] for c in ev["per_class"]) == round(ev["top1"] * ev["count"])


@pytest.mark.parametrize(
    ("split", "expected_split", "count"),
    [
        ([], "holdout", 12),  # synthetic's own disjoint test set: max(60 // 5, 10)
        (["--split", "holdout"], "holdout", 12),
        (["--split", "val"], "val", 15),  # the version's val_split 0.25, not the default 0.2
        (["--split", "all"], "all", 60),
    ],
)
def test_evaluate_splits_per_class_and_confusion_matrix(
    tmp_path: Path, split: list[str], expected_split: str, count: int
) -> None:
    home = tmp_path / "home"
    labels = list(synthetic.LABELS)
    card = _labelled_version(home, labels, dataset="synthetic:60",
                             train_config={"seed": 3, "val_split": 0.25})  # fmt: skip
    r = run_cli("evaluate", card.version, "--dataset", "synthetic:60", *split, "--json",
                home=home, env={"ALEXNET_DEVICE": "cpu"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert (ev["split"], ev["count"]) == (expected_split, count)
    assert isinstance(ev["top5"], float)
    assert ev["includes_training_images"] is (expected_split == "all")
    _check_report(ev, labels)

    r = run_cli("evaluate", card.version, "--dataset", "synthetic:60", *split, home=home,
                env={"ALEXNET_DEVICE": "cpu"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"({expected_split}: " in lines[0] and f"; {count} images)" in lines[0]
    assert "top-1" in lines[0] and "top-5" in lines[0]
    assert ("training images" in lines[0]) is (expected_split == "all")
    assert "per class:" in lines and any(line.startswith("confusion matrix") for line in lines)
    for c in ev["per_class"]:  # one table row per class: label, count, correct
        assert any(line.split()[:3] == [c["label"], str(c["count"]), str(c["correct"])]
                   for line in lines)  # fmt: skip


def test_evaluate_a_few_classes_on_the_frozen_holdout(tmp_path: Path) -> None:
    """An imagefolder's holdout is drawn at its first use (15% of each class, at least one
    of a class of 3 or more) and is the default split; `all` is train + val, never the
    holdout; with three classes top-5 is trivially 100%, so it is null / not shown."""
    home = tmp_path / "home"
    classes = ["apple", "banana", "cherry"]
    _imagefolder(home, "fruit", classes, per_class=4)
    card = _labelled_version(home, classes)

    r = run_cli("evaluate", card.version, "--dataset", "imagefolder:fruit", "--json", home=home)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert (ev["split"], ev["count"], ev["top5"]) == ("holdout", 3, None)  # one per class
    _check_report(ev, classes)
    assert all(c["count"] == 1 for c in ev["per_class"])  # stratified
    again = run_cli("evaluate", card.version, "--dataset", "imagefolder:fruit", "--json",
                    home=home)  # fmt: skip
    assert json.loads(again.stdout)["confusion_matrix"] == ev["confusion_matrix"]  # frozen

    r = run_cli("evaluate", card.version, "--dataset", "imagefolder:fruit", "--split", "all",
                home=home)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "; 9 images)" in r.stdout and "top-1" in r.stdout and "top-5" not in r.stdout


def test_evaluate_holdout_of_classes_too_small_to_keep_any_out(tmp_path: Path) -> None:
    home = tmp_path / "home"
    classes = ["apple", "banana"]
    _imagefolder(home, "tiny", classes, per_class=2)
    card = _labelled_version(home, classes)
    r = run_cli("evaluate", card.version, "--dataset", "imagefolder:tiny", "--json", home=home)
    assert r.returncode == 0 and json.loads(r.stdout)["split"] == "val", r.stderr
    r = run_cli("evaluate", card.version, "--dataset", "imagefolder:tiny", "--split",
                "holdout", home=home)  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    [line] = r.stderr.strip().splitlines()
    assert "has no holdout images" in line
    assert "--split val" in line and "--split all" in line


def test_evaluate_many_classes_prints_the_worst_ten(tmp_path: Path) -> None:
    home = tmp_path / "home"
    classes = [f"k{i:02d}" for i in range(22)]
    _imagefolder(home, "many", classes, per_class=1)
    card = _labelled_version(home, classes)
    r = run_cli("evaluate", card.version, "--dataset", "imagefolder:many", "--split", "all",
                home=home)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = lines.index("worst 10 of 22 classes:")
    rows = lines[start + 2 : start + 12]
    assert all(line.split()[0] in classes for line in rows)
    accuracies = [float(line.split()[-1].rstrip("%")) for line in rows]
    assert accuracies == sorted(accuracies)
    assert "the confusion matrix is in --json (confusion_matrix)" in lines
    assert not any(line.startswith("confusion matrix") for line in lines)

    r = run_cli("evaluate", card.version, "--dataset", "imagefolder:many", "--split", "all",
                "--json", home=home)  # fmt: skip
    ev = json.loads(r.stdout)
    assert ev["count"] == 22 and len(ev["confusion_matrix"]) == 22
    _check_report(ev, classes)
