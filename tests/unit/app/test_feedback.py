"""app/feedback.py: the store (content-addressed blobs, records, labels and their history,
splits drawn once, retention, the byte budget, reconciliation after a crash, snapshots)
and the keeper's bounded queue; and model/stats.py's Wilson interval."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from app.feedback import Answer, FeedbackError, FeedbackKeeper, FeedbackStore, holdout_rank
from model.datasets import Manifest
from model.stats import PairedResult, pooled, wilson
from tests.helpers.datasets import shape_images

LABELS = ["circle", "square", "triangle"]


def store(tmp_path: Path, **kw: float) -> FeedbackStore:
    opts = {"max_bytes": 10**9, "retention_s": 3600.0, "holdout_share": 0.5, **kw}
    return FeedbackStore(tmp_path / "feedback", tmp_path / "alexnet.db", **opts)  # type: ignore[arg-type]


def answer(
    pid: str, data: bytes, top: int = 0, version: str = "v1", at: float | None = None
) -> Answer:
    return Answer(pid.ljust(32, "0"), data, version, LABELS, [(top, 0.9), ((top + 1) % 3, 0.1)],
                  created_at=at or time.time())  # fmt: skip


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [data for _, data in sorted(shape_images(3, 4).items())]


def blobs(s: FeedbackStore) -> list[Path]:
    return sorted(s.blobs.glob("*/*"))


def test_kept_content_addressed_and_deduplicated(tmp_path: Path, images: list[bytes]) -> None:
    s = store(tmp_path)
    kept, dropped = s.keep([answer("a", images[0]), answer("b", images[0]), answer("c", images[1])])
    assert (kept, dropped) == (3, {})
    assert [p.name for p in blobs(s)] == sorted(hashlib.sha256(d).hexdigest() for d in images[:2])
    assert s.bytes == len(images[0]) + len(images[1])
    item = s.get("a".ljust(32, "0"))
    assert item is not None and item["version"] == "v1" and item["predicted"] == "circle"
    assert item["predictions"][0] == (0, 0.9) and item["label"] is None
    # deleting one of two answers with the same bytes keeps the image for the other
    s.delete("a".ljust(32, "0"))
    assert len(blobs(s)) == 2 and s.image("b".ljust(32, "0"))[1] in ("image/png", "image/jpeg")
    freed = s.delete("b".ljust(32, "0"))
    assert freed == len(images[0]) and len(blobs(s)) == 1
    with pytest.raises(FeedbackError) as err:
        s.delete("b".ljust(32, "0"))
    assert err.value.kind == "not_found"


def test_labels_replace_keep_history_and_the_split_never_moves(
    tmp_path: Path, images: list[bytes]
) -> None:
    s = store(tmp_path, holdout_share=0.5)
    pid = "a".ljust(32, "0")
    s.keep([answer("a", images[0]), answer("b", images[0])])
    old, first = s.label(pid, "square")
    assert old is None
    assert first["label"] == "square" and first["split"] in ("train", "holdout")
    want = "holdout" if holdout_rank(hashlib.sha256(images[0]).hexdigest()) < 0.5 else "train"
    assert first["split"] == want
    s.holdout_share = 1.0 if want == "train" else 0.0  # a share that would draw the other
    old, again = s.label(pid, "triangle")
    assert old == "square"
    assert again["label"] == "triangle" and again["split"] == first["split"]
    assert [h["label"] for h in s.history(pid)] == ["square", "triangle"]
    # a copy of the same image labelled later joins the same split whatever the share now
    assert s.label("b".ljust(32, "0"), "circle")[1]["split"] == first["split"]
    with pytest.raises(FeedbackError) as err:
        s.label(pid, "squar")
    assert err.value.kind == "bad_label" and "'square'" in err.value.message
    assert err.value.details["labels"] == LABELS
    with pytest.raises(FeedbackError) as err:
        s.label("f" * 32, "square")
    assert err.value.kind == "not_found"


def test_summary_confusion_and_wilson_accuracy(tmp_path: Path, images: list[bytes]) -> None:
    s = store(tmp_path)
    # v1 says circle to all four; two are circles, one a square, one a triangle
    s.keep([answer(str(i), images[i], top=0) for i in range(5)])
    for i, label in enumerate(["circle", "circle", "square", "triangle"]):
        s.label(str(i).ljust(32, "0"), label)
    summary = s.summary()
    assert (summary["kept"], summary["labelled"], summary["unlabelled"]) == (5, 4, 1)
    assert summary["per_label"] == {"circle": 2, "square": 1, "triangle": 1}
    assert summary["confusion"][0] == {"predicted": "circle", "label": "circle", "count": 2}
    (v1,) = summary["versions"]
    assert v1["version"] == "v1" and v1["labelled"] == 4
    assert v1["top1"]["correct"] == 2 and v1["top1"]["accuracy"] == 0.5
    assert (v1["top1"]["low"], v1["top1"]["high"]) == pytest.approx(wilson(2, 4))
    assert v1["top5"]["correct"] == 3  # square was its second answer
    page, total = s.items(wrong=True, limit=1)
    assert total == 2 and len(page) == 1
    assert s.items(label="square")[1] == 1 and s.items(version="v2")[1] == 0
    assert s.items(labelled=False)[1] == 1


def test_wilson_interval() -> None:
    assert wilson(0, 0) == (None, None)
    low, high = wilson(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35  # 0.2775: a zero count is not "exactly 0%"
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(10, 10)[1] == pytest.approx(1.0)
    both = pooled([PairedResult(10, 8, 5, 4, 1), PairedResult(5, 5, 0, 5, 0)])
    assert (both.n, both.b, both.c, both.candidate_correct) == (15, 9, 1, 13)


def test_retention_and_budget_drop_unlabelled_oldest_first(
    tmp_path: Path, images: list[bytes]
) -> None:
    budget = sum(len(d) for d in images[:4]) - 1  # the fourth fits only if one goes
    s = store(tmp_path, max_bytes=budget, retention_s=100.0)
    now = time.time()
    s.keep([answer(str(i), images[i], at=now - 50 + i) for i in range(3)])
    s.label("0".ljust(32, "0"), "circle")  # labelled: kept however old
    kept, dropped = s.keep([answer("3", images[3], at=now)])
    assert (kept, dropped) == (1, {})
    assert s.get("1".ljust(32, "0")) is None  # the oldest unlabelled made room
    assert s.get("0".ljust(32, "0")) is not None and s.bytes <= budget
    assert s.expire(now=now + 200) == 2  # every unlabelled one, past retention
    assert s.get("0".ljust(32, "0")) is not None and len(blobs(s)) == 1
    with pytest.raises(FeedbackError) as err:  # an expired id is unknown now
        s.label("3".ljust(32, "0"), "circle")
    assert err.value.kind == "not_found" and "expired" in err.value.message
    # only labelled ones left and no room: the new answer is not kept
    s2 = store(tmp_path / "two", max_bytes=len(images[0]) + 1)
    s2.keep([answer("a", images[0])])
    s2.label("a".ljust(32, "0"), "circle")
    assert s2.keep([answer("b", images[1])]) == (0, {"store_full": 1})


def test_reconcile_after_a_crash(tmp_path: Path, images: list[bytes]) -> None:
    s = store(tmp_path)
    s.keep([answer("a", images[0]), answer("b", images[1])])
    s.label("a".ljust(32, "0"), "circle")
    # what a kill leaves: a half-written temp file, a blob renamed in whose record never
    # committed, and a record whose blob is gone (a disk restored from another time)
    s.tmp.mkdir(exist_ok=True)
    (s.tmp / "partial").write_bytes(b"half")
    orphan = hashlib.sha256(images[2]).hexdigest()
    s.blob_path(orphan).parent.mkdir(parents=True, exist_ok=True)
    s.blob_path(orphan).write_bytes(images[2])
    s.blob_path(hashlib.sha256(images[1]).hexdigest()).unlink()
    s.close()
    s = store(tmp_path)
    assert s.reconcile() == {"orphan_blobs": 1, "dangling_records": 1}
    assert [p.name for p in blobs(s)] == [hashlib.sha256(images[0]).hexdigest()]
    assert s.get("b".ljust(32, "0")) is None
    assert not (s.tmp / "partial").exists()
    item = s.get("a".ljust(32, "0"))  # labels and their split survive the restart
    assert item is not None and item["label"] == "circle" and item["split"]
    assert s.bytes == len(images[0])


def test_snapshot_keeps_the_labels_order_and_each_split(
    tmp_path: Path, images: list[bytes]
) -> None:
    s = store(tmp_path, holdout_share=0.5)
    s.keep([answer(str(i), images[i]) for i in range(6)])
    for i in range(6):
        s.label(str(i).ljust(32, "0"), LABELS[i % 3])
    s.keep([answer("x", images[7])])
    s.label("x".ljust(32, "0"), "square")
    labels = ["triangle", "square", "circle", "hexagon"]  # a version's order, one unlabelled
    dest = tmp_path / "data" / ".feedback" / "job1"
    dest.parent.mkdir(parents=True)
    man = s.snapshot(dest, labels)
    assert man.classes == labels and len(man.images) == 7
    assert Manifest.read(dest).hash == man.hash
    splits = {im.sha256: im.split for im in man.images}
    for item in s.labelled(LABELS, ("train", "holdout")):
        assert splits[item["sha256"]] == ("holdout" if item["split"] == "holdout" else "trainval")
        assert (
            labels[next(im.label for im in man.images if im.sha256 == item["sha256"])]
            == item["label"]
        )
    # the job keeps its copy when an answer is deleted; the store no longer has it
    s.delete("0".ljust(32, "0"))
    assert all((dest / im.path).is_file() for im in man.images)
    held = s.snapshot(tmp_path / "data" / ".feedback" / "judge", labels, splits=("holdout",))
    assert {im.split for im in held.images} <= {"holdout"}
    assert json.loads((dest / "manifest.json").read_text())["holdout"]["from"] == "feedback"


def test_keeper_queue_is_bounded_and_never_blocks(tmp_path: Path, images: list[bytes]) -> None:
    s = store(tmp_path)
    seen: list[tuple[int, dict[str, int]]] = []
    keeper = FeedbackKeeper(
        s, max_items=2, max_bytes=10**9, on_result=lambda k, d: seen.append((k, d))
    )
    # not started: nothing drains the queue, so the third offer finds it full
    assert keeper.offer(answer("a", images[0])) and keeper.offer(answer("b", images[1]))
    t0 = time.monotonic()
    assert not keeper.offer(answer("c", images[2]))
    assert time.monotonic() - t0 < 1.0  # a generous bound: it must not wait for room
    assert seen == [(0, {"queue_full": 1})]
    small = FeedbackKeeper(s, max_items=10, max_bytes=len(images[0]) + 1)
    assert small.offer(answer("d", images[0])) and not small.offer(answer("e", images[1]))
    keeper.start()
    keeper.wait_written("b".ljust(32, "0"), 10.0)
    keeper.stop()
    assert s.get("a".ljust(32, "0")) and s.get("b".ljust(32, "0"))
    assert s.get("c".ljust(32, "0")) is None and (2, {}) in seen


def test_a_snapshot_adds_to_a_dataset_and_alone_is_one(tmp_path: Path, images: list[bytes]) -> None:
    from model.data import load_dataset, with_feedback
    from tests.helpers.datasets import write_tree

    s = store(tmp_path, holdout_share=0.5)
    s.keep([answer(str(i), images[i]) for i in range(12)])
    for i in range(12):
        s.label(str(i).ljust(32, "0"), LABELS[i % 3])
    data = tmp_path / "data"
    write_tree(data / "shapes", shape_images(3, 6, seed=9))
    (data / ".feedback").mkdir(parents=True)
    man = s.snapshot(data / ".feedback" / "j1", LABELS)
    n_train = sum(im.split == "trainval" for im in man.images)
    opts = {"data_dir": data, "image_size": 64, "val_split": 0.25, "seed": 0}
    base = load_dataset("imagefolder:shapes", **opts)  # type: ignore[arg-type]
    fb = load_dataset("feedback:j1", **opts, pre=base.pre)  # type: ignore[arg-type]
    assert fb.labels == LABELS and len(fb.train) + len(fb.val) == n_train
    assert fb.test is not None and len(fb.test) == len(man.images) - n_train
    both = with_feedback(base, fb)
    assert len(both.train) == len(base.train) + len(fb.train)
    assert len(both.val) == len(base.val) + len(fb.val)
    assert both.test is base.test and both.holdout_hash == base.holdout_hash
    assert both.split["feedback"]["train"] == len(fb.train) and both.hash != base.hash
    x, y = both.train[len(both.train) - 1]  # a feedback image, at the dataset's size
    assert tuple(x.shape) == tuple(base.train[0][0].shape) and 0 <= y < 3
    s.snapshot(data / ".feedback" / "other", ["square", "circle", "triangle"])
    with pytest.raises(ValueError, match="labels"):
        with_feedback(base, load_dataset("feedback:other", **opts, pre=base.pre))  # type: ignore[arg-type]


def test_promotion_on_both_holdouts() -> None:
    from app.activation import decide
    from model.checkpoint import ModelCard

    def card(v: str) -> ModelCard:
        return ModelCard(format_version=1, version=v, arch="alexnet", labels=LABELS,
                         num_classes=3, image_size=64, resize_size=73, mean=(0.5,) * 3,
                         std=(0.25,) * 3, dataset="imagefolder:shapes", dataset_hash="h",
                         holdout_hash="hh", created_at="2026-12-01T00:00:00Z", sha256="0" * 64)  # fmt: skip

    new, old = card("new"), card("old")
    even = PairedResult(n=40, candidate_correct=20, other_correct=20, b=3, c=3)
    fixes = PairedResult(n=20, candidate_correct=18, other_correct=6, b=12, c=0)
    d = decide("if_better", new, old, result=even, feedback=fixes)
    assert d.activate and "feedback holdout" in d.reason and "on both together" in d.reason
    assert d.promotion["holdouts"]["dataset"]["size"] == 40
    assert d.promotion["holdouts"]["feedback"]["only_candidate_right"] == 12
    assert d.promotion["p_value"] == pytest.approx(pooled([even, fixes]).p_value)
    # better on traffic but worse beyond chance on the dataset: refused
    worse = PairedResult(n=40, candidate_correct=10, other_correct=30, b=0, c=20)
    d = decide("if_better", new, old, result=worse, feedback=fixes)
    assert not d.activate and "worse by more than chance" in d.reason
    # the feedback holdout alone decides a job on feedback alone
    d = decide("if_better", new, old, feedback=fixes)
    assert d.activate and set(d.promotion["holdouts"]) == {"feedback"}


def test_deletions_race_with_labels_and_batches(tmp_path: Path, images: list[bytes]) -> None:
    s = store(tmp_path)
    a, b = "a".ljust(32, "0"), "b".ljust(32, "0")
    s.keep([answer("a", images[0])])
    s.label(a, "circle")  # labelled after eviction picked it: eviction leaves it
    assert s._delete_ids([a], only_unlabelled=True) == 0 and s.get(a) is not None
    # a batch whose known bytes lose their last other answer to eviction keeps them again
    budget = len(images[1]) + len(images[2]) - 1
    t = store(tmp_path / "t", max_bytes=budget)
    t.keep([answer("b", images[1])])
    # (b's bytes are c's too: room for d is not made by dropping them)
    assert t.keep([answer("c", images[1]), answer("d", images[2])]) == (1, {"store_full": 1})
    item = t.get("c".ljust(32, "0"))
    assert item is not None and t.blob_path(item["sha256"]).is_file()
    assert t.get(b) is not None and t.bytes <= budget
    # more than everything unlabelled could free: nothing is dropped for it
    u = store(tmp_path / "u", max_bytes=len(images[0]) + len(images[1]))
    u.keep([answer("e", images[0]), answer("f", images[1])])
    u.label("e".ljust(32, "0"), "circle")
    assert u.keep([answer("g", images[1] + b"x" * 10)]) == (0, {"store_full": 1})
    assert u.get("f".ljust(32, "0")) is not None  # not evicted in vain


def test_history_is_bounded_and_a_repeat_changes_nothing(
    tmp_path: Path, images: list[bytes]
) -> None:
    from app.feedback import HISTORY_KEPT

    s = store(tmp_path)
    pid = "a".ljust(32, "0")
    s.keep([answer("a", images[0])])
    s.label(pid, "square")
    s.label(pid, "square")
    assert [h["label"] for h in s.history(pid)] == ["square"]
    for i in range(HISTORY_KEPT + 5):
        s.label(pid, LABELS[i % 3])
    assert len(s.history(pid)) == HISTORY_KEPT and len(s.history(pid, last=3)) == 3
    (v,) = s.summary()["versions"]
    assert v["labelled"] == 1 and v["top1"]["correct"] == (s.get(pid)["label"] == "circle")  # type: ignore[index]


def test_reconcile_leaves_a_live_server_alone(tmp_path: Path, images: list[bytes]) -> None:
    import os

    s = store(tmp_path)
    s.keep([answer("a", images[0])])
    # a live process's temp folder and a fresh blob another server has not recorded yet
    live = s.tmp / f"{os.getpid()}-feedcafe"
    live.mkdir(parents=True)
    dead = s.tmp / "999999999-deadbeef"
    dead.mkdir()
    fresh = hashlib.sha256(images[1]).hexdigest()
    s.blob_path(fresh).parent.mkdir(parents=True, exist_ok=True)
    s.blob_path(fresh).write_bytes(images[1])
    # and a record whose blob row is gone (deleted under it)
    with s._tx() as db:
        db.execute("INSERT INTO feedback (prediction_id, sha256, version, predictions, predicted, "
                   "created_at) VALUES (?, ?, 'v1', '[]', 'circle', 0)", ("z" * 32, "f" * 64))  # fmt: skip
    got = s.reconcile(grace_s=60.0)
    assert got == {"orphan_blobs": 0, "dangling_records": 1}
    assert live.is_dir() and not dead.exists() and s.blob_path(fresh).is_file()
    assert s.reconcile()["orphan_blobs"] == 1  # alone now: no grace


def test_a_full_disk_or_a_failed_commit_keeps_nothing_half(
    tmp_path: Path, images: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os
    import sqlite3

    s = store(tmp_path)
    real_write = os.write

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    assert s.keep([answer("a", images[0])]) == (0, {"disk_full": 1})
    monkeypatch.setattr(os, "write", real_write)
    assert blobs(s) == [] and s.bytes == 0 and not any(s._own_tmp.iterdir())
    # the database refusing the batch (its own disk full): the new blobs go too
    real_tx = s._tx

    def failing_tx():  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(s, "_tx", failing_tx)
    with pytest.raises(sqlite3.OperationalError):
        s.keep([answer("b", images[1])])
    monkeypatch.setattr(s, "_tx", real_tx)
    assert blobs(s) == [] and s.bytes == 0
    assert s.keep([answer("b", images[1])]) == (1, {})  # and its version is recorded then
    assert s.version_labels("v1") == LABELS
