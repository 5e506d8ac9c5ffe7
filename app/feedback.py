"""Feedback on answers (ALEXNET_FEEDBACK=true): what was classified, kept content-addressed,
the labels users send back, live accuracy per version, and labelled snapshots for training.

On disk, under `$ALEXNET_HOME/feedback/`:

- `blobs/<sha[:2]>/<sha256>`: each accepted upload's bytes, once per content (written to
  `tmp/` and renamed in, so a blob is whole or absent);
- the records, in SQLite beside the jobs (`alexnet.db`): `feedback` (one row per answer:
  prediction id, blob hash, answering version, its top-5, time; the label, when it was
  given, and the split it was assigned to at its first labelling), `feedback_labels` (every
  label ever sent: the history), `feedback_blobs` (hash and size), `feedback_versions`
  (each answering version's labels, so labels are checked after the version is gone).

Writes happen on one writer thread fed by a bounded queue (`FeedbackKeeper`): the request
path only offers the item, and an item the queue or the disk cannot take is not kept and
counted. A blob is renamed in before its record commits; a kill between the two leaves a
blob without a record, which `reconcile` (at start) removes, as it removes records whose
blob is missing or of the wrong size. Unlabelled items go after the retention period and
oldest first when the store is over its byte budget; labelled items stay until deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from model.data import FEEDBACK_SNAPSHOTS
from model.datasets import MANIFEST_FILE, Image, Manifest, Member, content_hash, holdout_digest
from model.files import atomic_write_bytes, fsync_dir
from model.images import sniff_format
from model.stats import wilson

log = logging.getLogger(__name__)

Split = Literal["train", "holdout"]
BATCH: Final = 256  # answers per transaction, at most
LINGER_S: Final = 0.05  # after a short batch, wait this long for more
HISTORY_KEPT: Final = 100  # labels kept per answer (the newest)
TOP_K_KEPT: Final = 5  # each answer's top-5 is kept, whatever top_k the client asked for
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS feedback (
    prediction_id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    version TEXT NOT NULL,
    predictions TEXT NOT NULL,
    predicted TEXT NOT NULL,
    created_at REAL NOT NULL,
    label TEXT,
    labelled_at REAL,
    split TEXT,
    top1_hit INTEGER,
    in_top5 INTEGER
);
CREATE INDEX IF NOT EXISTS feedback_created ON feedback (label, created_at);
CREATE INDEX IF NOT EXISTS feedback_sha ON feedback (sha256);
CREATE INDEX IF NOT EXISTS feedback_version ON feedback (version);
CREATE TABLE IF NOT EXISTS feedback_labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prediction_id TEXT NOT NULL,
    label TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_labels_id ON feedback_labels (prediction_id);
CREATE TABLE IF NOT EXISTS feedback_blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback_versions (
    version TEXT PRIMARY KEY,
    labels TEXT NOT NULL
);
"""


class FeedbackError(Exception):
    """kind: not_found | bad_label | busy."""

    def __init__(self, kind: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.details = kind, message, details


@dataclass(frozen=True)
class Answer:
    """One answer to keep: the upload's bytes and what the version said."""

    prediction_id: str
    data: bytes
    version: str
    labels: list[str]  # the version's labels (kept once per version)
    top: list[tuple[int, float]]  # (index, probability), best first, up to TOP_K_KEPT
    created_at: float = field(default_factory=time.time)


def holdout_rank(sha256: str) -> float:
    """Where content ranks in [0, 1): below the holdout share goes to the holdout. A hash of
    the content, so every copy of an image lands in the same split."""
    h = hashlib.sha256(b"alexnet-feedback-holdout:" + sha256.encode()).hexdigest()
    return int(h[:13], 16) / 16**13


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def snapshot_names(config: Mapping[str, Any]) -> list[str]:
    """The feedback snapshots a job's config reads (`feedback:<name>`)."""
    specs = (config.get("dataset"), config.get("feedback"))
    return [v.split(":", 1)[1] for v in specs if isinstance(v, str) and v.startswith("feedback:")]


def snapshot_dir(data_dir: Path, name: str) -> Path:
    return data_dir / FEEDBACK_SNAPSHOTS / name


def remove_snapshots(data_dir: Path, config: Mapping[str, Any]) -> None:
    """A finished job's snapshots: gone with it (deleted answers are then gone for good)."""
    for name in snapshot_names(config):
        shutil.rmtree(snapshot_dir(data_dir, name), ignore_errors=True)


class FeedbackStore:
    """The kept answers and their labels (thread-safe; one SQLite connection)."""

    def __init__(self, root: Path, db_path: Path, *, max_bytes: int, retention_s: float,
                 holdout_share: float) -> None:  # fmt: skip
        self.root, self.max_bytes, self.retention_s = root, max_bytes, retention_s
        self.holdout_share = holdout_share
        self.blobs, self.tmp = root / "blobs", root / "tmp"  # made at the first write
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)  # fmt: skip
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._versions: set[str] = set()
        self._labels: dict[str, list[str]] = {}
        self._dirs: set[str] = set()  # blob folders known to exist
        # Held by whatever adds or removes blobs (keep, deletions, reconcile): a deletion
        # never unlinks bytes a batch has just checked or renamed in.
        self._write = threading.RLock()
        # This process's temp files (tmp/<pid>-<random>/): another server's start leaves
        # them alone while this process lives.
        self._own_tmp = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.bytes = self._total_bytes()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _total_bytes(self) -> int:
        return int(self._query("SELECT COALESCE(SUM(size), 0) FROM feedback_blobs")[0][0])

    def blob_path(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    # -- keeping (the writer thread)

    def keep(self, answers: list[Answer]) -> tuple[int, dict[str, int]]:
        """Write the answers' blobs, then their records in one transaction. Returns (kept,
        {reason: dropped}); reasons: store_full (over ALEXNET_FEEDBACK_MAX_BYTES with
        not enough unlabelled to drop), disk_full. Under the write lock: no deletion runs
        between a blob's check and its record."""
        with self._write:
            return self._keep(answers)

    def _keep(self, answers: list[Answer]) -> tuple[int, dict[str, int]]:
        dropped: dict[str, int] = {}
        rows: list[tuple[Answer, str, int]] = []
        new_blobs: dict[str, int] = {}
        for a in answers:
            sha = hashlib.sha256(a.data).hexdigest()
            size = len(a.data)
            known = sha in new_blobs or bool(self._query(
                "SELECT 1 FROM feedback_blobs WHERE sha256 = ?", (sha,)))  # fmt: skip
            if not known:
                needed = {r[1] for r in rows}  # bytes this batch already counts on
                if self.bytes + size > self.max_bytes and not self._make_room(size, needed):
                    dropped["store_full"] = dropped.get("store_full", 0) + 1
                    continue
                try:
                    self._write_blob(sha, a.data)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    dropped["disk_full"] = dropped.get("disk_full", 0) + 1
                    continue
                new_blobs[sha] = size
                self.bytes += size
            rows.append((a, sha, size))
        now = time.time()
        versions: set[str] = set()
        try:
            with self._tx() as db:
                db.executemany("INSERT OR IGNORE INTO feedback_blobs (sha256, size, created_at) "
                               "VALUES (?, ?, ?)", [(s, n, now) for s, n in new_blobs.items()])  # fmt: skip
                for a, sha, size in rows:
                    if (
                        sha not in new_blobs
                        and db.execute(
                            "SELECT 1 FROM feedback_blobs WHERE sha256 = ?", (sha,)
                        ).fetchone()
                        is None
                    ):
                        # made room by dropping the last other answer with these bytes: the
                        # bytes are at hand, so keep them again
                        self._write_blob(sha, a.data)
                        db.execute("INSERT INTO feedback_blobs (sha256, size, created_at) "
                                   "VALUES (?, ?, ?)", (sha, size, now))  # fmt: skip
                        new_blobs[sha] = size
                        self.bytes += size
                    if a.version not in self._versions:
                        db.execute("INSERT OR IGNORE INTO feedback_versions VALUES (?, ?)",
                                   (a.version, json.dumps(a.labels)))  # fmt: skip
                        versions.add(a.version)
                    top = [[i, round(p, 6)] for i, p in a.top[:TOP_K_KEPT]]
                    db.execute(
                        "INSERT OR IGNORE INTO feedback (prediction_id, sha256, version, "
                        "predictions, predicted, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (a.prediction_id, sha, a.version, json.dumps(top),
                         a.labels[a.top[0][0]] if a.top else "", a.created_at),
                    )  # fmt: skip
        except BaseException:
            # nothing of the batch was recorded: its new blobs are not kept either
            for sha, size in new_blobs.items():
                self.blob_path(sha).unlink(missing_ok=True)
                self.bytes -= size
            raise
        self._versions |= versions  # (after the commit: a rolled-back batch retries them)
        return len(rows), dropped

    def _write_blob(self, sha: str, data: bytes) -> None:
        """Write to this process's temp folder, rename into blobs/: a blob is whole or
        absent (the same bytes as any earlier copy, so replacing one is harmless). Plain os
        calls, folders made once: this runs for every kept answer."""
        folder = str(self.blobs / sha[:2])
        for attempt in (0, 1):
            if folder not in self._dirs:
                Path(folder).mkdir(parents=True, exist_ok=True)
                self._own_tmp.mkdir(parents=True, exist_ok=True)
                self._dirs.add(folder)
            tmp = f"{self._own_tmp}/{sha}.{uuid.uuid4().hex[:8]}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
                os.replace(tmp, f"{folder}/{sha}")
                return
            except FileNotFoundError:
                Path(tmp).unlink(missing_ok=True)
                if attempt:
                    raise
                self._dirs.clear()  # a folder went away (a purge by hand): make it again
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _make_room(self, size: int, needed: set[str]) -> bool:
        """Drop the oldest unlabelled answers until `size` more bytes fit, never one whose
        bytes are `needed` (by the batch being kept); nothing is dropped when even dropping
        all that may go would not make room."""
        if size > self.max_bytes:
            return False
        freeable = int(self._query(
            "SELECT COALESCE(SUM(size), 0) FROM feedback_blobs WHERE sha256 NOT IN "
            "(SELECT sha256 FROM feedback WHERE label IS NOT NULL)")[0][0])  # fmt: skip
        for sha in needed:
            row = self._query("SELECT size FROM feedback_blobs WHERE sha256 = ?", (sha,))
            freeable -= row[0][0] if row else 0
        if self.bytes - freeable + size > self.max_bytes:
            return False
        seen: set[str] = set()
        while self.bytes + size > self.max_bytes:
            rows = self._query("SELECT prediction_id, sha256 FROM feedback WHERE label IS NULL "
                               "ORDER BY created_at LIMIT 64 OFFSET ?", (len(seen),))  # fmt: skip
            if not rows:
                return False
            for pid, sha in rows:  # one at a time: no more than room needs
                if sha in needed:
                    seen.add(pid)
                    continue
                self._delete_ids([pid], only_unlabelled=True)
                if self.bytes + size <= self.max_bytes:
                    return True
        return True

    def _delete_ids(self, ids: list[str], *, only_unlabelled: bool = False) -> int:
        """Delete these answers (`only_unlabelled`: those still unlabelled in the same
        transaction, so a label sent meanwhile keeps its answer), their label history,
        and blobs no answer uses any more; the bytes freed."""
        if not ids:
            return 0
        cond = " AND label IS NULL" if only_unlabelled else ""
        with self._write, self._tx() as db:
            shas: set[str] = set()
            gone: list[tuple[str]] = []
            for i in ids:
                row = db.execute("SELECT sha256 FROM feedback WHERE prediction_id = ?" + cond, (i,))  # noqa: S608
                found = [r[0] for r in row]
                if found:
                    shas.update(found)
                    gone.append((i,))
            db.executemany("DELETE FROM feedback WHERE prediction_id = ?", gone)
            db.executemany("DELETE FROM feedback_labels WHERE prediction_id = ?", gone)
            unused = [s for s in shas if db.execute(
                "SELECT 1 FROM feedback WHERE sha256 = ? LIMIT 1", (s,)).fetchone() is None]  # fmt: skip
            sizes = {}
            for sha in unused:
                row = db.execute("SELECT size FROM feedback_blobs WHERE sha256 = ?", (sha,))
                sizes[sha] = (row.fetchone() or (0,))[0]
                db.execute("DELETE FROM feedback_blobs WHERE sha256 = ?", (sha,))
            # Records first, then files (still under the write lock, so no keep renames the
            # same bytes back in between): a kill between leaves an orphan blob, which
            # reconcile removes, never a record without its image.
            for s in unused:
                self.blob_path(s).unlink(missing_ok=True)
            freed = sum(sizes.values())
            self.bytes -= freed
        return freed

    def expire(self, now: float | None = None) -> int:
        """Drop unlabelled answers older than the retention period; how many."""
        cutoff = (now or time.time()) - self.retention_s
        n = 0
        while True:
            old = self._query("SELECT prediction_id FROM feedback WHERE label IS NULL AND "
                              "created_at < ? LIMIT 500", (cutoff,))  # fmt: skip
            if not old:
                with self._write:
                    self.bytes = self._total_bytes()  # (another process's deletions too)
                return n
            self._delete_ids([r[0] for r in old], only_unlabelled=True)
            n += len(old)

    def reconcile(self, *, grace_s: float = 0.0) -> dict[str, int]:
        """After a crash (at start, before this process writes): temp files of processes
        that are gone removed, blobs without a record removed, records whose blob is
        missing or the wrong size removed. `grace_s`: leave blobs younger than this (another
        live server may be between a blob and its record)."""
        with self._write:
            return self._reconcile(grace_s)

    def _reconcile(self, grace_s: float) -> dict[str, int]:
        if self.tmp.is_dir():
            for d in self.tmp.iterdir():
                pid = d.name.split("-", 1)[0]
                if d == self._own_tmp or (pid.isdigit() and _pid_alive(int(pid))):
                    continue
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        self._dirs.clear()
        known = {r[0]: r[1] for r in self._query("SELECT sha256, size FROM feedback_blobs")}
        used = {r[0] for r in self._query("SELECT DISTINCT sha256 FROM feedback")}
        orphans = 0
        on_disk: dict[str, int] = {}
        young = time.time() - grace_s
        for p in self.blobs.glob("*/*"):
            st = p.stat()
            if p.name in known and p.name in used and known[p.name] == st.st_size:
                on_disk[p.name] = st.st_size
            elif grace_s and st.st_mtime > young:
                continue
            else:
                p.unlink(missing_ok=True)
                orphans += 1
        gone = [s for s in known if s not in on_disk]
        with self._tx() as db:
            dangling = 0
            for s in gone:
                dangling += db.execute("DELETE FROM feedback WHERE sha256 = ?", (s,)).rowcount
                db.execute("DELETE FROM feedback_blobs WHERE sha256 = ?", (s,))
            dangling += db.execute("DELETE FROM feedback WHERE sha256 NOT IN "
                                   "(SELECT sha256 FROM feedback_blobs)").rowcount  # fmt: skip
            db.execute("DELETE FROM feedback_labels WHERE prediction_id NOT IN "
                       "(SELECT prediction_id FROM feedback)")  # fmt: skip
        self.bytes = self._total_bytes()
        if orphans or dangling:
            log.warning("feedback: removed %d blob(s) without a record and %d record(s) "
                        "without their blob (left by a crash)", orphans, dangling)  # fmt: skip
        return {"orphan_blobs": orphans, "dangling_records": dangling}

    # -- labels

    def version_labels(self, version: str) -> list[str] | None:
        """The labels of a version that answered (kept with its first answer)."""
        labels = self._labels.get(version)
        if labels is None:
            rows = self._query("SELECT labels FROM feedback_versions WHERE version = ?",
                               (version,))  # fmt: skip
            if not rows:
                return None
            labels = self._labels[version] = json.loads(rows[0][0])
        return labels

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM feedback WHERE prediction_id = ?", (prediction_id,))
        return self._item(rows[0]) if rows else None

    def label(self, prediction_id: str, label: str) -> tuple[str | None, dict[str, Any]]:
        """Record `label` for an answer (replacing an earlier one; the history keeps both):
        (the label it replaced, the answer now). The split is drawn at the first labelling
        and never changes. Raises FeedbackError."""
        item = self.get(prediction_id)
        if item is None:
            raise FeedbackError("not_found", f"no kept answer {prediction_id}: unknown, "
                                "expired (unlabelled answers are kept for "
                                "ALEXNET_FEEDBACK_RETENTION_DAYS), deleted, or never kept")  # fmt: skip
        labels = self.version_labels(item["version"]) or []
        if label not in labels:
            import difflib

            close = difflib.get_close_matches(label, labels, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise FeedbackError(
                "bad_label",
                f"label: {label[:100]!r} is not one of the {len(labels)} labels of version "
                f"{item['version']}, which gave this answer{hint} (GET /v1/models/active "
                "lists the served version's labels; the details list this one's)",
                details={"version": item["version"], "labels": labels},
            )
        now = time.time()
        with self._tx() as db:
            split = item["split"]
            if split is None:
                same = db.execute("SELECT split FROM feedback WHERE sha256 = ? AND split IS "
                                  "NOT NULL LIMIT 1", (item["sha256"],)).fetchone()  # fmt: skip
                split = (
                    same[0]
                    if same
                    else (
                        "holdout" if holdout_rank(item["sha256"]) < self.holdout_share else "train"
                    )
                )
            want = labels.index(label)
            top = [i for i, _ in item["predictions"]]
            hit, in5 = int(top[:1] == [want]), int(want in top[:TOP_K_KEPT])
            changed = db.execute(
                "UPDATE feedback SET label = ?, labelled_at = ?, split = ?, top1_hit = ?, "
                "in_top5 = ? WHERE prediction_id = ?",
                (label, now, split, hit, in5, prediction_id))  # fmt: skip
            if changed.rowcount == 0:  # deleted meanwhile
                raise FeedbackError("not_found", f"no kept answer {prediction_id}")
            if item["label"] != label:  # the same label again changes nothing
                db.execute("INSERT INTO feedback_labels (prediction_id, label, at) VALUES "
                           "(?, ?, ?)", (prediction_id, label, now))  # fmt: skip
                # a bounded history: the newest HISTORY_KEPT labels of each answer
                db.execute("DELETE FROM feedback_labels WHERE prediction_id = ? AND id NOT IN "
                           "(SELECT id FROM feedback_labels WHERE prediction_id = ? ORDER BY "
                           "id DESC LIMIT ?)", (prediction_id, prediction_id, HISTORY_KEPT))  # fmt: skip
        return item["label"], {**item, "label": label, "labelled_at": now, "split": split}

    def history(self, prediction_id: str, *, last: int = -1) -> list[dict[str, Any]]:
        """The labels sent for an answer, oldest first (the `last` ones; -1: all)."""
        rows = self._query("SELECT label, at FROM feedback_labels WHERE prediction_id = ? "
                           "ORDER BY id DESC LIMIT ?", (prediction_id, last))  # fmt: skip
        return [{"label": r["label"], "at": r["at"]} for r in reversed(rows)]

    @staticmethod
    def _item(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["predictions"] = [tuple(p) for p in json.loads(d["predictions"])]
        return d

    # -- reading

    def summary(self) -> dict[str, Any]:
        """Counts, per label, the confusion (largest cells first) and live accuracy per
        version (top-1 and top-5 with 95% Wilson intervals)."""
        q = self._query
        kept = q("SELECT COUNT(*), COUNT(label) FROM feedback")[0]
        per_label = {r[0]: r[1] for r in q("SELECT label, COUNT(*) FROM feedback WHERE label "
                                           "IS NOT NULL GROUP BY label ORDER BY 2 DESC, 1")}  # fmt: skip
        splits = {r[0]: r[1] for r in q("SELECT split, COUNT(*) FROM feedback WHERE label IS "
                                        "NOT NULL GROUP BY split")}  # fmt: skip
        confusion = [{"predicted": r[0], "label": r[1], "count": r[2]} for r in q(
            "SELECT predicted, label, COUNT(*) FROM feedback WHERE label IS NOT NULL GROUP BY "
            "predicted, label ORDER BY 3 DESC, 1, 2 LIMIT 100")]  # fmt: skip
        versions = self._accuracies()
        return {
            "kept": kept[0], "labelled": kept[1], "unlabelled": kept[0] - kept[1],
            "bytes": self.bytes, "max_bytes": self.max_bytes, "per_label": per_label,
            "splits": {"train": splits.get("train", 0), "holdout": splits.get("holdout", 0)},
            "confusion": confusion, "versions": versions,
        }  # fmt: skip

    def _accuracies(self) -> list[dict[str, Any]]:
        """Per version that answered (with answers kept): labelled count, top-1 and top-5
        hits (counted in SQL: the hits are stored with each label)."""
        rows = self._query("SELECT version, COUNT(label), SUM(top1_hit), SUM(in_top5) FROM "
                           "feedback GROUP BY version ORDER BY version")  # fmt: skip
        return [{"version": r[0], "labelled": r[1], "top1": _rate(r[2] or 0, r[1]),
                 "top5": _rate(r[3] or 0, r[1])} for r in rows]  # fmt: skip

    def items(self, *, label: str | None = None, version: str | None = None,
              wrong: bool = False, labelled: bool | None = None, limit: int = 50,
              offset: int = 0) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
        """Answers, newest first, filtered; and how many match."""
        where, args = ["1"], []
        if label is not None:
            where.append("label = ?")
            args.append(label)
        if version is not None:
            where.append("version = ?")
            args.append(version)
        if wrong:
            where.append("label IS NOT NULL AND label != predicted")
        if labelled is not None:
            where.append("label IS NOT NULL" if labelled else "label IS NULL")
        cond = " AND ".join(where)  # fixed clauses; the values are bound
        count = "SELECT COUNT(*) FROM feedback WHERE " + cond  # noqa: S608
        page = ("SELECT * FROM feedback WHERE " + cond  # noqa: S608
                + " ORDER BY created_at DESC, prediction_id LIMIT ? OFFSET ?")  # fmt: skip
        total = self._query(count, tuple(args))[0][0]
        rows = self._query(page, (*args, limit, offset))
        return [self._item(r) for r in rows], int(total)

    def image(self, prediction_id: str) -> tuple[bytes, str]:
        """The kept upload's bytes (at most an upload's size) and media type, read now: a
        deletion right after cannot break the answer. Raises FeedbackError(not_found)."""
        item = self.get(prediction_id)
        try:
            if item is None:
                raise FileNotFoundError
            data = self.blob_path(item["sha256"]).read_bytes()
        except FileNotFoundError:
            raise FeedbackError("not_found", f"no kept answer {prediction_id}") from None
        fmt = sniff_format(data[:32])
        return data, f"image/{fmt.lower()}" if fmt else "application/octet-stream"

    def delete(self, prediction_id: str) -> int:
        """Forget one answer (its image too, unless another answer has the same bytes)."""
        if self.get(prediction_id) is None:
            raise FeedbackError("not_found", f"no kept answer {prediction_id}")
        return self._delete_ids([prediction_id])

    def purge(self, older_than_s: float, *, now: float | None = None) -> tuple[int, int]:
        """Forget every answer (labelled or not) older than `older_than_s`: (count, bytes)."""
        cutoff = (now or time.time()) - older_than_s
        n = freed = 0
        while True:
            rows = self._query("SELECT prediction_id FROM feedback WHERE created_at < ? "
                               "LIMIT 500", (cutoff,))  # fmt: skip
            if not rows:
                return n, freed
            freed += self._delete_ids([r[0] for r in rows])
            n += len(rows)

    # -- training data

    def labelled_all(self) -> list[dict[str, Any]]:
        """Every labelled answer, oldest label first."""
        return [self._item(r) for r in self._query(
            "SELECT f.*, b.size FROM feedback f JOIN feedback_blobs b USING (sha256) WHERE "
            "f.label IS NOT NULL ORDER BY f.labelled_at, f.prediction_id")]  # fmt: skip

    def labelled(self, labels: list[str], splits: tuple[Split, ...]) -> list[dict[str, Any]]:
        """Labelled answers whose label is one of `labels`, in `splits` (oldest first)."""
        wanted = set(labels)
        return [it for it in self.labelled_all() if it["label"] in wanted and it["split"] in splits]

    def snapshot(self, dest: Path, labels: list[str], *,
                 splits: tuple[Split, ...] = ("train", "holdout")) -> Manifest:  # fmt: skip
        """Labelled feedback as a dataset folder a job reads (`feedback:<dest.name>`): the
        images hard-linked (copied across file systems) into `dest/images/`, a manifest with
        `labels` as its classes in that order (a fine-tune keeps its base's head) and each
        item's own split: train -> the pool a job splits into train/val, holdout -> the
        holdout. Written beside `dest` and renamed in. Deleting an answer later leaves the
        snapshot's copy to the job reading it."""
        items = self.labelled(labels, splits)
        index = {lab: i for i, lab in enumerate(labels)}
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        (tmp / "images").mkdir(parents=True)
        try:
            seen: set[tuple[str, str]] = set()
            images = []
            for it in items:
                key = (it["sha256"], it["label"])
                if key in seen:
                    continue
                seen.add(key)
                rel = f"images/{it['sha256']}"
                target = tmp / rel
                if not target.exists():
                    src = self.blob_path(it["sha256"])
                    try:
                        os.link(src, target)
                    except FileNotFoundError:
                        continue  # deleted meanwhile
                    except OSError:
                        shutil.copyfile(src, target)
                images.append(Image(rel, index[it["label"]],
                                    "holdout" if it["split"] == "holdout" else "trainval",
                                    it["sha256"], it["size"]))  # fmt: skip
            images.sort(key=lambda i: (i.path, i.label))
            n_held = sum(i.split == "holdout" for i in images)
            man = Manifest(
                name=dest.name, classes=list(labels), images=images, layout="class_folders",
                holdout={"share": self.holdout_share, "seed": None, "from": "feedback",
                         "images": n_held, "hash": holdout_digest(images)},
                skipped=[], source=f"labelled feedback: {len(images)} image(s)",
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                hash=content_hash(images), total_bytes=sum(i.size for i in images),
            )  # fmt: skip
            atomic_write_bytes(tmp / MANIFEST_FILE, man.to_bytes())
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
            fsync_dir(dest.parent)
            return man
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def export_members(store: FeedbackStore, skipped: list[str]) -> Iterator[Member]:
    """Labelled feedback as dataset entries in the pre-split layout: `train/<label>/<sha>`
    for the train share and `test/<label>/<sha>` for the holdout (so the export's holdout is
    the feedback holdout). Labels no archive can name, and labels with nothing in the train
    share, are left out and listed in `skipped`."""
    items = store.labelled_all()
    has_train = {it["label"] for it in items if it["split"] == "train"}
    bad = {lab for lab in {it["label"] for it in items}
           if lab in (".", "..") or "/" in lab or "\\" in lab or "\x00" in lab}  # fmt: skip
    for lab in sorted({it["label"] for it in items} - has_train - bad):
        skipped.append(f"label {lab!r}: nothing in the train share yet")
    for lab in sorted(bad):
        skipped.append(f"label {lab!r}: not usable as a folder name")
    dirs: set[str] = set()
    done: set[str] = set()
    for it in items:
        lab = it["label"]
        if lab in bad or lab not in has_train:
            continue
        top = "test" if it["split"] == "holdout" else "train"
        for d in (top, f"{top}/{lab}"):
            if d not in dirs:
                dirs.add(d)
                yield Member(d, "dir", lambda _n: b"")
        path = store.blob_path(it["sha256"])
        try:
            with path.open("rb") as f:
                fmt = (sniff_format(f.read(32)) or "bin").lower()
        except FileNotFoundError:
            continue  # deleted meanwhile
        rel = f"{top}/{lab}/{it['sha256'][:16]}.{ {'jpeg': 'jpg'}.get(fmt, fmt) }"
        if rel in done:
            continue
        done.add(rel)

        def read(limit: int, path: Path = path) -> bytes:
            with path.open("rb") as fh:
                return fh.read(limit + 1)

        yield Member(rel, "file", read)


def _rate(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {"correct": k, "accuracy": k / n if n else None, "low": low, "high": high}


class FeedbackKeeper:
    """The bounded queue between the request path and the store's writer thread. `offer`
    never blocks: an answer the queue cannot take (by count or bytes) is dropped and
    counted."""

    def __init__(self, store: FeedbackStore, *, max_items: int, max_bytes: int,
                 on_result: Callable[[int, dict[str, int]], None] | None = None,
                 expire_every_s: float = 60.0) -> None:  # fmt: skip
        self.store, self.max_bytes = store, max_bytes
        self._q: queue.Queue[Answer | None] = queue.Queue(maxsize=max_items)
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._pending: dict[str, threading.Event] = {}
        self.on_result = on_result or (lambda kept, dropped: None)
        self.expire_every_s = expire_every_s
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # set: write now (a label waits, or stopping)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._q.put(None, timeout=timeout_s)
        self._wake.set()
        self._thread.join(timeout_s)
        self._thread = None

    def offer(self, answer: Answer) -> bool:
        size = len(answer.data)
        with self._bytes_lock:
            if self._queued_bytes + size > self.max_bytes:
                self.on_result(0, {"queue_full": 1})
                return False
            self._queued_bytes += size
        event = threading.Event()
        self._pending[answer.prediction_id] = event
        try:
            self._q.put_nowait(answer)
        except queue.Full:
            with self._bytes_lock:
                self._queued_bytes -= size
            self._pending.pop(answer.prediction_id, None)
            self.on_result(0, {"queue_full": 1})
            return False
        return True

    def wait_written(self, prediction_id: str, timeout_s: float) -> None:
        """Block until an answer still in the queue is written (or not kept); at once for
        any other id."""
        event = self._pending.get(prediction_id)
        if event is not None:
            self._wake.set()
            event.wait(timeout_s)

    def _run(self) -> None:
        # Behind serving: nice 10 (Linux's nice is per thread) gives the model and decode
        # threads the CPU first, yet leaves this thread enough (~0.5 ms per answer) to keep
        # up when they saturate it (at 19 it starves, and the queue overflows). It holds the
        # GIL only between calls that release it (hashing, file writes and SQLite all do).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        last_expire = 0.0
        while True:
            try:  # (a timeout: retention is applied on an idle server too)
                batch = [self._q.get(timeout=self.expire_every_s)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < BATCH and batch[-1] is not None:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = bool(batch) and batch[-1] is None
            answers = [a for a in batch if a is not None]
            try:
                if answers:
                    kept, dropped = self.store.keep(answers)
                    self.on_result(kept, dropped)
            except Exception:  # the writer must outlive whatever one batch does
                log.exception("feedback: could not keep %d answer(s)", len(answers))
                self.on_result(0, {"error": len(answers)})
            finally:
                with self._bytes_lock:
                    self._queued_bytes -= sum(len(a.data) for a in answers)
                for a in answers:
                    ev = self._pending.pop(a.prediction_id, None)
                    if ev is not None:
                        ev.set()
            if time.monotonic() - last_expire > self.expire_every_s:
                last_expire = time.monotonic()
                try:
                    self.store.expire()
                except Exception:
                    log.exception("feedback: applying the retention period failed")
            if stop:
                return
            if batch and len(batch) < BATCH:
                # Let a few more arrive: one transaction and one wake-up for many answers
                # (a label for an answer still queued cuts it short: wait_written).
                self._wake.wait(LINGER_S)
                self._wake.clear()
