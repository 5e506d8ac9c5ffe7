"""The dataset store without HTTP: layouts, the frozen stratified holdout, the content
hash, a folder made by hand, folder imports and the limits (the hostile archives go
through the API in tests/api/test_datasets.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from model.data import load_dataset
from model.datasets import (
    DatasetImportError,
    DatasetStore,
    ImportLimits,
    ensure_manifest,
    holdout_count,
)
from tests.helpers.datasets import shape_images, tar_bytes, write_tree, zip_bytes


@pytest.mark.parametrize(
    ("n", "expected"), [(1, 0), (2, 0), (3, 1), (4, 1), (10, 2), (20, 3), (100, 15)]
)
def test_holdout_count(n: int, expected: int) -> None:
    assert holdout_count(n, 0.15) == expected
    assert n - holdout_count(n, 0.9) >= min(n, 2)  # always two left to train on


def test_the_holdout_is_stratified_seeded_and_independent_of_the_archive(tmp_path: Path) -> None:
    files = shape_images(3, 20)
    store = DatasetStore(tmp_path / "data")
    a = store.import_archive(io.BytesIO(zip_bytes(files)), "a", source="t")
    # the same files in another order, another container, under a top folder
    reordered = dict(reversed(list(files.items())))
    b = store.import_archive(io.BytesIO(tar_bytes({f"top/{k}": v for k, v in reordered.items()})),
                             "b", source="t")  # fmt: skip
    c = store.import_folder(write_tree(tmp_path / "src", files), "c")
    assert a.hash == b.hash == c.hash
    held = {i.path for i in a.images if i.split == "holdout"}
    assert held == {i.path for i in b.images if i.split == "holdout"}
    assert all(per == {"trainval": 17, "holdout": 3} for per in a.counts().values())
    # another share draws another holdout; the hash (the contents) stays
    d = DatasetStore(tmp_path / "data2", holdout_share=0.3).import_archive(
        io.BytesIO(zip_bytes(files)), "a", source="t")  # fmt: skip
    assert d.hash == a.hash and d.split_totals()["holdout"] == 18


@pytest.mark.parametrize("val_split", [0.2, 0.5])
def test_jobs_never_see_the_holdout(tmp_path: Path, val_split: float) -> None:
    store = DatasetStore(tmp_path)
    m = store.import_archive(io.BytesIO(zip_bytes(shape_images(3, 12))), "ds", source="t")
    bundle = load_dataset("imagefolder:ds", data_dir=tmp_path, image_size=64,
                          val_split=val_split, seed=3)  # fmt: skip
    assert bundle.test is not None
    files = bundle.train.dataset.files  # type: ignore[attr-defined]
    rel = lambda p: p.relative_to(tmp_path / "ds").as_posix()  # noqa: E731
    train = {rel(files[i][0]) for i in bundle.train.indices}
    val = {rel(files[i][0]) for i in bundle.val.indices}
    holdout = {rel(p) for p, _ in bundle.test.files}  # type: ignore[attr-defined]
    assert holdout == {i.path for i in m.images if i.split == "holdout"}
    assert not (train & holdout) and not (val & holdout) and not (train & val)
    assert len(train) + len(val) + len(holdout) == 36
    assert bundle.hash == m.hash and bundle.split["holdout"] == len(holdout) == 6


def test_a_folder_made_by_hand_gets_a_frozen_manifest(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "flowers", shape_images(2, 10))
    (folder / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "loose.jpg").write_bytes(next(iter(shape_images(1, 1).values())))
    m = ensure_manifest(folder)
    assert m.source == "folder made by hand" and m.split_totals() == {"trainval": 16, "holdout": 4}
    reasons = {s["path"]: s["reason"] for s in m.skipped}
    assert "circle/broken.png" in reasons and "not in a class folder" in reasons["loose.jpg"]
    # files added later are not silently part of it: the manifest is the record
    write_tree(folder, {"circle/new.png": next(iter(shape_images(1, 1).values()))})
    assert ensure_manifest(folder) == m
    # nothing was moved or deleted in a user's folder
    assert (folder / "loose.jpg").is_file() and (folder / "circle" / "broken.png").is_file()


def test_pre_split_without_test_draws_the_holdout_from_train(tmp_path: Path) -> None:
    files = shape_images(2, 10, prefix="train/") | shape_images(2, 3, prefix="val/", seed=9)
    m = DatasetStore(tmp_path).import_archive(io.BytesIO(zip_bytes(files)), "p", source="t")
    assert m.layout == "pre_split" and m.holdout["from"] == "drawn"
    assert m.split_totals() == {"train": 16, "holdout": 4, "val": 6}
    b = load_dataset("imagefolder:p", data_dir=tmp_path, image_size=64, val_split=0.5, seed=0)
    assert (len(b.train), len(b.val), b.split["layout"]) == (16, 6, "pre_split")  # kept


def test_folder_imports_refuse_links_and_limits_hold(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", shape_images(2, 4))
    os.symlink("/etc/passwd", src / "circle" / "x.png")
    store = DatasetStore(tmp_path / "data")
    with pytest.raises(DatasetImportError, match="is a link") as exc:
        store.import_folder(src, "linked")
    assert exc.value.kind == "malformed"
    (src / "circle" / "x.png").unlink()
    small = DatasetStore(tmp_path / "data", ImportLimits(max_files=5))
    with pytest.raises(DatasetImportError, match="more than 5") as exc:
        small.import_folder(src, "many")
    assert exc.value.kind == "too_many_files"
    tars = DatasetStore(tmp_path / "data", ImportLimits(max_files=5))
    with pytest.raises(DatasetImportError, match="more than 5"):
        tars.import_archive(io.BytesIO(tar_bytes(shape_images(2, 4))), "many", source="t")
    assert not list((tmp_path / "data").glob("*many*")) and not list(
        (tmp_path / "data").glob(".tmp-*")
    )
    # an oversized image is skipped, not fatal
    tiny = DatasetStore(tmp_path / "data", ImportLimits(max_file_bytes=2000))
    m = tiny.import_folder(src, "ok")
    assert m.skipped and all("larger than 2000" in s["reason"] for s in m.skipped)
    assert store.import_folder(src, "ok2").skipped == []
    assert sorted(store.names()) == ["ok", "ok2"]
    assert store.delete("ok2") > 0 and store.names() == ["ok"]
