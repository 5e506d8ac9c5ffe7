"""Admin training jobs' records, in SQLite (`$ALEXNET_HOME/jobs.sqlite3`).

Statuses: queued -> running -> succeeded | failed | cancelled | interrupted.
`interrupted` means the service stopped (or the child was stopped by someone else) while the
job ran; its last epoch state is on disk and POST /admin/jobs/{id}/resume continues it.
Every change is one committed transaction; `update(expect=...)` is a compare-and-set, so a
cancel and the runner never overwrite each other.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from app.schemas import JobRequest

Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
RESUMABLE: Final = frozenset({"interrupted", "cancelled"})
Activate = Literal["if_better", "always", "never"]


@dataclass
class Job:
    id: str
    status: Status
    config: dict[str, Any]
    activate: Activate
    nproc_per_node: int = 1
    launch: dict[str, Any] | None = None  # nnodes, max_restarts, rdzv_endpoint (torchrun)
    source: str = "api"  # api | bootstrap
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    images_per_s: float | None = None
    eta_s: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    result_version: str | None = None
    metrics: dict[str, Any] | None = None
    activated: bool = False
    activation: str | None = None  # why it was or was not activated
    promotion: dict[str, Any] | None = None  # if_better's numbers (app/activation.py)
    error: str | None = None
    pid: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    resume: bool = False  # the next run continues the saved state
    purged_at: float | None = None  # when its resumable state was deleted
    tracking: dict[str, Any] | None = None  # per backend: model/run.py's Tracking news


_JSON_COLUMNS: Final = ("config", "history", "metrics", "promotion", "tracking", "launch")
_BOOL_COLUMNS: Final = ("activated", "cancel_requested", "resume")
_COLUMNS: Final = frozenset(Job.__dataclass_fields__) - {"id"}
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    activate TEXT NOT NULL,
    nproc_per_node INTEGER NOT NULL DEFAULT 1,
    source TEXT NOT NULL DEFAULT 'api',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    epoch INTEGER NOT NULL DEFAULT 0,
    epochs INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    images_per_s REAL,
    eta_s REAL,
    history TEXT NOT NULL DEFAULT '[]',
    result_version TEXT,
    metrics TEXT,
    activated INTEGER NOT NULL DEFAULT 0,
    activation TEXT,
    promotion TEXT,
    error TEXT,
    pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    purged_at REAL,
    tracking TEXT,
    launch TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class JobStore:
    """Job records in SQLite (WAL; every change is one committed transaction)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)  # fmt: skip
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._tx() as db:
            db.execute("PRAGMA journal_mode=WAL")
        with self._tx() as db:
            db.executescript(_SCHEMA)
            # Databases made before a column existed get it (each ALTER is one statement).
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            if "purged_at" not in have:
                db.execute("ALTER TABLE jobs ADD COLUMN purged_at REAL")
            if "promotion" not in have:
                db.execute("ALTER TABLE jobs ADD COLUMN promotion TEXT")
            if "tracking" not in have:
                db.execute("ALTER TABLE jobs ADD COLUMN tracking TEXT")
            if "launch" not in have:
                db.execute("ALTER TABLE jobs ADD COLUMN launch TEXT")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _row(row: sqlite3.Row) -> Job:
        d = dict(row)
        d.pop("seq")
        for k in _JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        for k in _BOOL_COLUMNS:
            d[k] = bool(d[k])
        return Job(**d)

    def create(self, req: JobRequest, *, source: str = "api") -> Job:
        """A queued job for `req` (its config with every default filled in)."""
        from app.schemas import LAUNCH_FIELDS, JobRequest

        job = Job(
            id=uuid.uuid4().hex[:12],
            status="queued",
            config=req.train_config().model_dump(mode="json"),
            activate=req.activate,
            nproc_per_node=req.nproc_per_node,
            launch={
                k: v
                for k, v in req.model_dump(include=set(LAUNCH_FIELDS)).items()
                if v != JobRequest.model_fields[k].default
            }
            or None,
            source=source,
            created_at=time.time(),
        )
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, status, config, activate, nproc_per_node, launch,"
                " source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, seq, job.status, json.dumps(job.config), job.activate,
                 job.nproc_per_node, json.dumps(job.launch) if job.launch else None,
                 job.source, job.created_at),
            )  # fmt: skip
        return job

    def get(self, job_id: str) -> Job | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def list(self, *, status: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        with self._tx() as db:
            if status:
                rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?",
                                  (status, limit)).fetchall()  # fmt: skip
            else:
                rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?",
                                  (limit,)).fetchall()  # fmt: skip
        return [self._row(r) for r in rows]

    def next_queued(self) -> Job | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
        return self._row(row) if row else None

    def status_counts(self) -> dict[str, int]:
        with self._tx() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def count(self, status: str) -> int:
        with self._tx() as db:
            n: int = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?",
                                (status,)).fetchone()[0]  # fmt: skip
        return n

    def update(self, job_id: str, *, expect: tuple[str, ...] | None = None,
               **fields: Any) -> bool:  # fmt: skip
        """Set `fields`; with `expect`, only while the status is one of those (returns
        whether a row changed: a compare-and-set against concurrent cancels)."""
        values = [
            json.dumps(v) if k in _JSON_COLUMNS and v is not None
            else int(v) if k in _BOOL_COLUMNS else v
            for k, v in fields.items()
        ]  # fmt: skip
        unknown = set(fields) - _COLUMNS
        if unknown:
            raise ValueError(f"unknown job columns {sorted(unknown)}")
        # Column names come from the fixed set above; values are bound parameters.
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"  # noqa: S608
        params: list[Any] = [*values, job_id]
        if expect:
            sql += f" AND status IN ({', '.join('?' * len(expect))})"
            params += list(expect)
        with self._tx() as db:
            return db.execute(sql, params).rowcount > 0
