"""The service's state, built by the lifespan and read by routes through dependencies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app import presence
from app.activation import decide, judge, judge_feedback
from app.batching import BatchStats, MicroBatcher
from app.datasets import dataset_store
from app.errors import ModelNotReady
from app.feedback import TOP_K_KEPT, Answer, FeedbackKeeper, FeedbackStore
from app.intake import Decoder
from app.jobs.metrics import JobsCollector
from app.jobs.runner import JobRunner
from app.jobs.store import Job, JobStore
from app.memory import MemoryTrimmer
from app.metrics import Metrics
from app.registry import FixedRegistry, LoadedModel, Registry, prepare
from app.settings import Settings, available_cpus
from model.checkpoint import CheckpointError, read_card
from model.data import DatasetError
from model.datasets import DatasetStore
from model.device import Placement, resolve
from model.images import DecodeLimits
from model.predictor import Row

log = logging.getLogger(__name__)

FEEDBACK_QUEUE_BYTES = 128 * 1024**2  # uploads waiting for the feedback writer, at most
# ALEXNET_MODEL_DIR: the job and feedback stores are in-memory databases no route writes
# (every /admin route answers 503 read_only, feedback is off), so nothing under
# ALEXNET_HOME is read or written and the routes keep their one code path.
IN_MEMORY = Path(":memory:")


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    placement: Placement
    batcher: MicroBatcher[LoadedModel]
    decoder: Decoder
    jobs: JobStore
    runner: JobRunner
    datasets: DatasetStore
    feedback: FeedbackStore
    keeper: FeedbackKeeper | None = None  # ALEXNET_FEEDBACK=true: keeps answers
    # Label writes (POST /v1/feedback) on a thread of their own, and how many wait for it.
    feedback_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="feedback-labels")
    )
    feedback_writes: int = 0
    started_at: float = field(default_factory=time.time)
    status: str = "starting"  # starting | loading | bootstrapping | ready | no_model
    status_detail: str = ""
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    bootstrap_job_id: str | None = None
    # Held by everything that changes the served model: an activation, the initial load,
    # the bootstrap's import and the ACTIVE watcher (through `activate`), a deletion.
    model_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    presence: Path | None = None  # this server's record under $ALEXNET_HOME/servers/
    trimmer: MemoryTrimmer = field(default_factory=lambda: MemoryTrimmer(0))

    @property
    def model(self) -> LoadedModel:
        current = self.registry.current
        if current is None:
            detail = self.status_detail
            if self.bootstrap_job_id:
                detail = self._bootstrap_detail(self.bootstrap_job_id)
            raise ModelNotReady(
                f"no model is loaded yet ({self.status}{': ' + detail if detail else ''})",
                retry_after_s=5,
                details={"status": self.status, "bootstrap_job": self.bootstrap_job_id},
            )
        return current

    def _bootstrap_detail(self, job_id: str) -> str:
        job = self.jobs.get(job_id)
        if job is None:
            return self.status_detail
        if job.status == "running":
            eta = f", about {job.eta_s:.0f} s left" if job.eta_s else ""
            return (f"training the built-in model on synthetic data (job {job.id}, epoch "
                    f"{job.epoch}/{job.epochs or job.config['epochs']}{eta})")  # fmt: skip
        if job.status in ("failed", "cancelled", "interrupted"):
            return f"the built-in model's training job {job.id} is {job.status}: {job.error or ''}"
        return f"training job {job.id} for the built-in model is {job.status}"

    def answer_top_k(self, loaded: LoadedModel, top_k: int) -> int:
        """The top-k to compute: the client's, or at least the top-5 kept for feedback."""
        return max(top_k, min(TOP_K_KEPT, loaded.card.num_classes)) if self.keeper else top_k

    def keep(self, prediction_id: str, data: bytes, loaded: LoadedModel, row: Row) -> None:
        """Offer an answer to the feedback writer (never blocks; dropped when full)."""
        if self.keeper is not None:
            self.keeper.offer(Answer(prediction_id, data, loaded.version, loaded.card.labels,
                                     row[:TOP_K_KEPT]))  # fmt: skip

    def warmup_sizes(self) -> tuple[int, ...]:
        """1, 2, 4, ... up to and with max_batch_size: the sizes warmed up, and int8's
        compiled programs (a batch between two is padded up to the next: at most 2x the
        work, where 1, 8, 32 padded a batch of 9 to 32 and int8 served slower than bf16 at
        concurrency 32)."""
        top = self.settings.max_batch_size
        return tuple(sorted({top, *(1 << i for i in range(top.bit_length()) if 1 << i <= top)}))

    def load(self, version: str) -> LoadedModel:
        """Blocking: load, check and warm a version (run it in a thread)."""
        return self.load_dir(self.registry.version_dir(version))

    def load_dir(self, folder: Path) -> LoadedModel:
        s = self.settings
        return prepare(folder, self.placement, channels_last=s.channels_last,
                       compile_model=s.compile, warmup_batch_sizes=self.warmup_sizes(),
                       cache_dir=None if s.model_dir is not None else s.cache_dir,
                       min_agreement=s.min_agreement)  # fmt: skip

    def serve(self, loaded: LoadedModel, *, persist: bool = True) -> None:
        previous = self.registry.swap(loaded, persist=persist)
        d = loaded.placement.describe()
        self.metrics.set_model(loaded.version, d["device"], d["precision"], loaded.compiled)
        self.status, self.status_detail = "ready", loaded.version
        if self.presence is not None:
            presence.update(self.presence, serving=loaded.version)
        c = loaded.card
        top1 = c.metrics.get("val_top1")
        log.info("serving version %s (%s, %d classes at %d px%s, %s) on %s, %s%s%s",
                 c.version, c.arch, c.num_classes, c.image_size,
                 f", val top-1 {top1:.1%}" if isinstance(top1, float) else "",
                 c.dataset or c.source, d["device"], d["precision"],
                 ", compiled" if loaded.compiled else "",
                 f"; was {previous.version}" if previous else "")  # fmt: skip

    async def activate(
        self, version: str, *, persist: bool = True
    ) -> tuple[LoadedModel, LoadedModel | None]:
        """Load, validate and warm `version`, then swap it in between batches and (with
        `persist`) write ACTIVE. One activation at a time; requests already batched finish
        on the model they were preprocessed for. Raises CheckpointError for a version that
        does not load."""
        async with self.model_lock:
            loaded = await asyncio.to_thread(self.load, version)
            previous = self.registry.current
            self.serve(loaded, persist=persist)
        return loaded, previous

    async def on_job_success(self, job: Job) -> None:
        """A job registered a version: activate it as its `activate` policy says (if_better:
        judged against the served version on the same holdout, app/activation.py)."""
        assert job.result_version
        card = read_card(self.registry.stored_version_dir(job.result_version))
        current = self.registry.current
        result, holdout, failure, fb, served_data = None, None, None, None, None
        if (
            job.activate == "if_better"
            and current is not None
            and current.card.labels == card.labels
        ):
            s = self.settings
            try:
                # A job on feedback alone has no dataset holdout besides the feedback one.
                on: dict[str, Any] = {"models_dir": self.registry.models_dir, "data_dir": s.data_dir,
                      "placement": current.placement, "holdout_share": s.holdout_split,
                      "channels_last": s.channels_last}  # fmt: skip
                if not (card.dataset or "").startswith("feedback:"):
                    result, holdout = await asyncio.to_thread(judge, card, current.card, **on)
                elif current.card.dataset and not current.card.dataset.startswith("feedback:"):
                    with contextlib.suppress(DatasetError, CheckpointError):  # (gone: none)
                        r, _ = await asyncio.to_thread(judge, card, current.card, **on,
                                                       of=current.card)  # fmt: skip
                        served_data = (r, current.card.dataset)
                fb = await asyncio.to_thread(
                    judge_feedback, card, current.card, self.feedback,
                    models_dir=self.registry.models_dir, data_dir=s.data_dir,
                    name=f"judge-{job.id}", placement=current.placement,
                    channels_last=s.channels_last)  # fmt: skip
            except (DatasetError, CheckpointError) as exc:
                failure = str(exc)
                log.warning("job %s: cannot judge %s on a holdout: %s", job.id, card.version, exc)
        d = decide(job.activate, card, current.card if current else None, result=result,
                   alpha=self.settings.promotion_alpha, holdout=holdout, feedback=fb,
                   served_data=served_data)  # fmt: skip
        reason = f"{d.reason}: {failure}" if failure else d.reason
        if d.activate:
            await self.activate(card.version)
        self.jobs.update(job.id, activated=d.activate, activation=reason,
                         promotion=d.promotion or None)  # fmt: skip

    async def load_initial(self) -> bool:
        """Serve ACTIVE, or the newest other good version if ACTIVE is broken."""
        async with self.model_lock:
            return await self._load_initial()

    async def _load_initial(self) -> bool:
        self.status = "loading"
        if isinstance(self.registry, FixedRegistry):
            return await self._load_fixed(self.registry.folder)
        for version in self.registry.candidates():
            try:
                loaded = await asyncio.to_thread(self.load, version)
            except CheckpointError as exc:
                log.error("cannot serve version %s: %s", version, exc)
                continue
            except Exception:  # whatever a broken version does, the service must come up
                log.exception("cannot serve version %s", version)
                continue
            # Never rewrite ACTIVE at startup: if it is broken, we serve the newest good
            # version and GET /v1/models shows "active" and "serving" apart.
            if version != self.registry.active_version():
                log.warning("ACTIVE names %s, which does not load: serving %s instead",
                            self.registry.active_version(), version)  # fmt: skip
            self.serve(loaded, persist=False)
            return True
        self.status = "no_model"
        return False

    async def _load_fixed(self, folder: Path) -> bool:
        """ALEXNET_MODEL_DIR: that folder or nothing. A folder that does not load leaves the
        service up and not ready, /readyz saying why (there is nothing to fall back to)."""
        try:
            loaded = await asyncio.to_thread(self.load_dir, folder)
        except Exception as exc:
            if not isinstance(exc, CheckpointError):
                log.exception("cannot serve ALEXNET_MODEL_DIR %s", folder)
            reason = f"ALEXNET_MODEL_DIR {folder} does not load: {exc}"
            log.error("%s; not ready", reason)
            self.status, self.status_detail = "no_model", reason
            return False
        self.serve(loaded, persist=False)
        return True


def build_state(settings: Settings) -> AppState:
    metrics = Metrics(settings.drift_window)
    fixed = settings.model_dir
    registry = FixedRegistry(fixed) if fixed is not None else Registry(settings.models_dir)
    db_path = IN_MEMORY if fixed is not None else settings.db_path
    placement = resolve(settings.device, settings.precision)

    def run_batch(model: LoadedModel, batch: torch.Tensor, top_k: int) -> list[Row]:
        return model.run_batch(batch, top_k)

    def on_batch(stats: BatchStats) -> None:
        metrics.batch_size.observe(stats.size)
        metrics.stage.labels("inference").observe(stats.compute_s)
        for w in stats.queue_wait_s:
            metrics.stage.labels("queue").observe(w)

    batcher: MicroBatcher[LoadedModel] = MicroBatcher(
        run_batch,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_ms=settings.max_batch_wait_ms,
        max_queue=settings.max_queue,
        max_queue_wait_s=settings.max_queue_wait_s,
        on_batch=on_batch,
    )
    # Half the cores decode; the model's own threads use the rest (measured on 2 cores:
    # one decode thread serves ~10% more images/s than two).
    if "OMP_NUM_THREADS" not in os.environ:  # torch counts the host's cores, not a quota
        torch.set_num_threads(available_cpus())
    threads = settings.decode_threads or max(1, available_cpus() // 2)
    decoder = Decoder(
        DecodeLimits(max_pixels=settings.max_image_pixels, max_side=settings.max_image_side),
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode"),
    )
    jobs = JobStore(db_path)
    if settings.run_jobs and fixed is None:
        # The job gauges come from the one server that runs jobs: replicas never read the
        # shared database for them (SQLite across nodes of a network filesystem).
        metrics.registry.register(JobsCollector(jobs))
    runner = JobRunner(
        jobs, settings.jobs_dir, settings.home,
        threads=settings.effective_job_threads, nice=settings.job_nice,
        stop_timeout_s=settings.shutdown_timeout_s, keep_job_state=settings.keep_job_state,
    )  # fmt: skip
    feedback = FeedbackStore(settings.feedback_dir, db_path,
                             max_bytes=settings.feedback_max_bytes,
                             retention_s=settings.feedback_retention_days * 86_400,
                             holdout_share=settings.holdout_split)  # fmt: skip
    keeper = None
    if settings.feedback and fixed is not None:
        log.warning("ALEXNET_FEEDBACK is ignored with ALEXNET_MODEL_DIR: this server keeps "
                    "nothing")  # fmt: skip
    elif settings.feedback:

        def counted(kept: int, dropped: dict[str, int]) -> None:
            metrics.feedback_kept.inc(kept)
            for reason, n in dropped.items():
                metrics.feedback_dropped.labels(reason).inc(n)

        keeper = FeedbackKeeper(feedback, max_items=settings.feedback_queue,
                                max_bytes=FEEDBACK_QUEUE_BYTES, on_result=counted)  # fmt: skip
    state = AppState(settings, registry, metrics, placement, batcher, decoder, jobs, runner,
                     dataset_store(settings), feedback, keeper,
                     trimmer=MemoryTrimmer(settings.memory_trim_s, metrics.memory_returned.inc))  # fmt: skip
    runner.on_success = state.on_job_success
    return state
