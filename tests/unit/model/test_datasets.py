"""The dataset store without HTTP: layouts, the frozen stratified holdout, the content
hash, a folder made by hand, folder imports and the limits (the hostile archives go
through the API in tests/api/test_datasets.py)."""

from __future__ import annotations

import errno
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


def test_folder_imports_do_not_follow_links_and_limits_hold(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", shape_images(2, 4))
    os.symlink("/etc/passwd", src / "circle" / "x.png")
    store = DatasetStore(tmp_path / "data")
    linked = store.import_folder(src, "linked")  # (an archive's link refuses it: the API tests)
    assert {"path": "circle/x.png", "reason": "a link: not followed"} in linked.skipped
    assert not (tmp_path / "data" / "linked" / "circle" / "x.png").exists()
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
    assert sorted(store.names()) == ["linked", "ok", "ok2"]
    assert store.delete("ok2") > 0 and store.names() == ["linked", "ok"]


def test_copies_of_a_holdout_image_are_held_out_and_a_new_image_moves_at_most_one(
    tmp_path: Path,
) -> None:
    files = shape_images(2, 20)
    twin = files["circle/004.jpg"]
    files |= {f"circle/copy-{i}.jpg": twin for i in range(3)} | {"square/also.jpg": twin}
    m = DatasetStore(tmp_path / "a").import_archive(io.BytesIO(zip_bytes(files)), "d", source="t")
    splits = {i.path: i.split for i in m.images}
    copies = [p for p, data in files.items() if data == twin]
    assert len({splits[p] for p in copies}) == 1, {p: splits[p] for p in copies}
    # one more image: the holdout draw of the rest stays (content-ranked, not positional)
    more = files | {"circle/new.png": next(iter(shape_images(1, 1, seed=77).values()))}
    m2 = DatasetStore(tmp_path / "b").import_archive(io.BytesIO(zip_bytes(more)), "d", source="t")
    before = {i.path for i in m.images if i.split == "holdout"}
    after = {i.path for i in m2.images if i.split == "holdout"}
    assert len(before ^ after) <= 2 and m.holdout["hash"] != m2.holdout["hash"]


def test_a_full_disk_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from any write of an import (here: the fsync of the third image; the API
    suite fills a real tmpfs): no_space, and nothing is left."""
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = DatasetStore(tmp_path)
    with pytest.raises(DatasetImportError, match="filled up") as exc:
        store.import_archive(io.BytesIO(zip_bytes(shape_images(2, 4))), "full", source="t")
    assert exc.value.kind == "no_space"
    assert store.names() == [] and not list(tmp_path.glob(".tmp-*"))


def test_a_replace_that_died_between_its_renames_is_put_back(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    m = store.import_archive(io.BytesIO(zip_bytes(shape_images(2, 4))), "ds", source="t")
    # the state a crash between `rename(final, trash)` and `rename(new, final)` leaves
    (tmp_path / "ds").rename(tmp_path / ".tmp-trash-ds-0123abcd")
    (tmp_path / ".tmp-import-ds-4567cdef").mkdir()
    (tmp_path / ".tmp-deleted-gone-89abcdef").mkdir()
    done = store.clean_stale()
    assert ".tmp-trash-ds-0123abcd -> ds" in done
    assert store.get("ds").hash == m.hash and not list(tmp_path.glob(".tmp-*"))
    # a live import's temp folder is left alone
    (tmp_path / ".tmp-import-ds-76543210").mkdir()
    with store.lock("ds"):
        store.clean_stale()
    assert (tmp_path / ".tmp-import-ds-76543210").is_dir()


def test_a_stray_file_beside_the_class_folders_is_reported(tmp_path: Path) -> None:
    files = shape_images(2, 4, prefix="top/") | {
        "top/cover.jpg": next(iter(shape_images(1, 1).values()))
    }
    m = DatasetStore(tmp_path).import_archive(io.BytesIO(zip_bytes(files)), "t", source="t")
    assert m.classes == ["circle", "triangle"] and len(m.images) == 8
    assert [s["path"] for s in m.skipped] == ["top/cover.jpg"]
