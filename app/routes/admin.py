"""/admin: training jobs and activation. Every route needs the bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse, PlainTextResponse

from app import paths
from app.deps import AdminDep, StateDep
from app.errors import (
    Conflict,
    NotFound,
    Overloaded,
    ValidationFailed,
    responses,
)
from app.feedback import remove_snapshots, snapshot_dir
from app.jobs.store import RESUMABLE, Job
from app.presence import serving_versions
from app.schemas import ActivateResponse, DeletedVersion, JobList, JobOut, JobRequest
from app.state import AppState
from app.storage import InUse, delete_version, purge_job
from model.checkpoint import CheckpointError, read_card
from model.data import DatasetError, resolve_dataset_dir
from model.datasets import MANIFEST_FILE, DatasetImportError
from model.run import LOG_FILE, PLOT_FILE

router = APIRouter(
    prefix=paths.ADMIN_PREFIX, tags=["admin"], dependencies=[AdminDep],
    responses=responses(401, 503),
)  # fmt: skip

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", examples=["3f2a9c1b7d4e"])]


def _job_or_404(state: AppState, job_id: str) -> Job:
    job = state.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def check_dataset(state: AppState, dataset: str) -> None:
    """An imagefolder must exist under the data dir now, not fail minutes later."""
    if not dataset.startswith("imagefolder:"):
        return
    name = dataset.split(":", 1)[1]
    try:
        path = resolve_dataset_dir(state.settings.data_dir, name)
        if not path.is_dir():
            raise DatasetError(f"dataset {name!r} does not exist: import one with POST /admin/datasets/"
                               f"{name} (GET /admin/datasets lists them)")  # fmt: skip
        if not (path / MANIFEST_FILE).is_file():
            # Class folders only: reading every image here would block the server.
            labels = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
            if len(labels) < 2:
                raise DatasetError(f"imagefolder {path} has {len(labels)} class folder(s); "
                                   "at least 2 are needed")  # fmt: skip
    except DatasetError as exc:
        raise ValidationFailed(
            f"dataset: {exc}", details=[{"loc": ["body", "dataset"], "msg": str(exc)}]
        ) from exc


def with_base(state: AppState, req: JobRequest) -> JobRequest:
    """A fine-tune: `active` resolved to the version it names (the record says what the run
    really started from), and the base's image size and arch unless given."""
    assert req.base is not None
    name = state.registry.active_version() if req.base == "active" else req.base
    try:
        card = read_card(state.registry.stored_version_dir(name or ""))
    except CheckpointError as exc:
        raise ValidationFailed(
            f"base: no model version {req.base!r} to fine-tune from (GET /v1/models lists them)",
            details=[{"loc": ["body", "base"], "msg": str(exc)}],
        ) from exc
    return req.model_copy(update=card.fine_tune_defaults(req.model_fields_set))


def feedback_snapshot(state: AppState, req: JobRequest) -> JobRequest:
    """Snapshot the labelled feedback with the base's labels for this job (blocking): the
    job reads `feedback:<name>`, so answers deleted meanwhile stay in its copy until it
    ends. 422 without enough labelled training items."""
    assert req.base is not None
    labels = read_card(state.registry.stored_version_dir(req.base)).labels
    name = f"job-{uuid.uuid4().hex[:12]}"
    dest = snapshot_dir(state.settings.data_dir, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    alone = req.dataset == "feedback"
    man = state.feedback.snapshot(dest, labels)
    n_train = sum(1 for im in man.images if im.split != "holdout")
    if n_train < (2 if alone else 1):
        shutil.rmtree(dest, ignore_errors=True)
        msg = (f"{n_train} labelled answer(s) with version {req.base}'s labels are in the "
               f"feedback's train share ({len(man.images) - n_train} in its holdout): label "
               "more answers (POST /v1/feedback) first")  # fmt: skip
        raise ValidationFailed(msg, details=[{"loc": ["body", "dataset" if alone else
                                                      "include_feedback"], "msg": msg}])  # fmt: skip
    spec = f"feedback:{name}"
    return req.model_copy(update={"dataset": spec} if alone else {"feedback": spec})


@router.post(
    "/jobs", status_code=202, response_model=JobOut,
    summary="Start a training job (the `alexnet train` options, snake_case)",
    responses=responses(400, 413, 422, 429, examples={
        400: ("invalid_request", "There was an error parsing the body"),
        413: ("payload_too_large", "request body is larger than 1048576 bytes")}),
)  # fmt: skip
async def create_job(req: JobRequest, state: StateDep) -> JobOut:
    if req.feedback is not None or req.dataset.startswith("feedback:"):
        raise ValidationFailed(
            "feedback: set by the service; ask for labelled feedback with include_feedback "
            'or "dataset": "feedback"', details=[{"loc": ["body", "feedback"], "msg": "not "
                                                  "accepted here"}])  # fmt: skip
    uses_feedback = req.include_feedback or req.dataset == "feedback"  # (base: active)
    if req.base is not None:
        req = with_base(state, req)
    queued = state.jobs.count("queued")
    if queued >= state.settings.max_queued_jobs:
        raise Overloaded(f"{queued} jobs are already queued; retry when one has started",
                         retry_after_s=60)  # fmt: skip
    if uses_feedback:
        req = await asyncio.to_thread(feedback_snapshot, state, req)
    # An imagefolder is checked and the job recorded under the dataset's lock: a deletion
    # or replacement of it sees the job, or the job sees the dataset gone (never neither).
    lock = (state.datasets.lock(req.dataset.split(":", 1)[1])
            if req.dataset.startswith("imagefolder:") else contextlib.nullcontext())  # fmt: skip
    try:
        with lock:
            check_dataset(state, req.dataset)
            job = state.jobs.create(req)
    except DatasetImportError as exc:
        remove_snapshots(state.settings.data_dir, req.train_config().model_dump())
        raise Conflict(str(exc)) from exc
    except BaseException:
        remove_snapshots(state.settings.data_dir, req.train_config().model_dump())
        raise
    state.runner.wake()
    return JobOut.of(job)


@router.get("/jobs", response_model=JobList, summary="Jobs, newest first")
async def list_jobs(state: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    return JobList(jobs=[JobOut.of(j) for j in state.jobs.list(limit=limit)])


@router.get("/jobs/{job_id}", response_model=JobOut, summary="One job: status, progress, "
            "per-epoch history, result", responses=responses(404))  # fmt: skip
async def get_job(job_id: JobId, state: StateDep) -> JobOut:
    return JobOut.of(_job_or_404(state, job_id))


@router.get(
    "/jobs/{job_id}/losses.png", summary="Training and validation loss curves",
    response_class=FileResponse,
    responses={**responses(404), 200: {"content": {"image/png": {}}}},
)  # fmt: skip
async def job_losses(job_id: JobId, state: StateDep) -> FileResponse:
    _job_or_404(state, job_id)
    path = state.runner.run_dir(job_id) / PLOT_FILE
    if not path.is_file():
        raise NotFound(f"job {job_id} has no loss plot yet: it appears after the first epoch")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get(
    "/jobs/{job_id}/log", summary="The end of the training process's output",
    response_class=PlainTextResponse, responses=responses(404),
)  # fmt: skip
async def job_log(
    job_id: JobId, state: StateDep,
    tail: Annotated[int, Query(ge=1, le=1_000_000, description="bytes from the end")] = 65536,
) -> PlainTextResponse:  # fmt: skip
    _job_or_404(state, job_id)
    path = state.runner.run_dir(job_id) / LOG_FILE
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - tail))
            data = f.read()
    except FileNotFoundError:
        data = b""
    return PlainTextResponse(data.decode(errors="replace"))


@router.delete("/jobs/{job_id}", response_model=JobOut, summary="Cancel a job, or purge "
               "a finished job's state",
               description="A queued job is cancelled at once. A running one finishes its "
               "step, saves its state (resumable) and is cancelled when its process exits. "
               "With `purge=true`, a job that is not queued or running has its resumable "
               "state deleted (~650 MB at 224 px; the record, log and loss plot stay); a "
               "purged cancelled or interrupted job can no longer resume.",
               responses=responses(404, 409))  # fmt: skip
async def cancel_job(
    job_id: JobId, state: StateDep,
    purge: Annotated[bool, Query(description="delete a finished job's resumable state")] = False,
) -> JobOut:  # fmt: skip
    job = _job_or_404(state, job_id)
    if purge:
        try:
            # (a thread: unlinking ~650 MB must not hold up the serving loop)
            await asyncio.to_thread(purge_job, job, jobs=state.jobs,
                                    jobs_dir=state.settings.jobs_dir)  # fmt: skip
        except InUse as exc:
            raise Conflict(str(exc)) from exc
        return JobOut.of(_job_or_404(state, job_id))
    if job.status in ("succeeded", "failed"):
        raise Conflict(f"job {job_id} is {job.status}; only queued or running jobs cancel")
    if job.status == "interrupted":
        state.jobs.update(job_id, expect=("interrupted",), status="cancelled")
    else:
        state.runner.cancel(job_id)
    return JobOut.of(_job_or_404(state, job_id))


@router.post("/jobs/{job_id}/resume", status_code=202, response_model=JobOut,
             summary="Continue an interrupted or cancelled job from its last saved state",
             responses=responses(404, 409, 429))  # fmt: skip
async def resume_job(job_id: JobId, state: StateDep) -> JobOut:
    job = _job_or_404(state, job_id)
    if job.status not in RESUMABLE:
        raise Conflict(f"job {job_id} is {job.status}; only interrupted or cancelled jobs resume")
    if job.purged_at is not None:
        raise Conflict(f"job {job_id}'s resumable state was deleted; start a new job instead")
    if state.jobs.count("queued") >= state.settings.max_queued_jobs:
        raise Overloaded("the job queue is full; retry when one has started", retry_after_s=60)
    if not state.runner.requeue(job_id):
        raise Conflict(f"job {job_id} changed state; fetch it and retry")
    return JobOut.of(_job_or_404(state, job_id))


@router.post(
    "/models/{version}/activate", response_model=ActivateResponse,
    summary="Validate, load and warm a version, then swap it in with no failed request",
    description="Requests already batched finish on the previous version; every later batch "
    "uses the new one. ACTIVE is replaced atomically. Roll back by activating the previous "
    "version.",
    responses=responses(404, 409, 422),
)  # fmt: skip
async def activate_version(
    version: Annotated[str, Path(examples=["20261127-031500-ab12"])], state: StateDep
) -> ActivateResponse:
    try:
        state.registry.stored_version_dir(version)
    except CheckpointError as exc:
        raise NotFound(f"no model version {version!r}") from exc
    try:
        loaded, previous = await state.activate(version)
    except CheckpointError as exc:
        raise ValidationFailed(f"version {version} does not load: {exc}") from exc
    info: dict[str, Any] = loaded.info()
    return ActivateResponse(
        active=loaded.version, previous=previous.version if previous else None, model=info
    )


@router.delete(
    "/models/{version}", response_model=DeletedVersion,
    summary="Delete a stored version that nothing needs",
    description="Refused (409) for the ACTIVE version, a version a server is serving, and "
    "the base of a queued, running or resumable job. The folder is renamed away before it "
    "is removed, so a crash never leaves a half-deleted version.",
    responses=responses(404, 409),
)  # fmt: skip
async def delete_model(
    version: Annotated[str, Path(examples=["20261127-031500-ab12"])], state: StateDep
) -> DeletedVersion:
    serving = serving_versions(state.settings.home)
    if state.registry.current is not None:
        serving.add(state.registry.current.version)
    async with state.model_lock:  # not while a swap may be loading it
        try:
            freed = await asyncio.to_thread(delete_version, version,
                                            models_dir=state.registry.models_dir,
                                            jobs=state.jobs, serving=serving,
                                            cache_dir=state.settings.cache_dir)  # fmt: skip
        except CheckpointError as exc:
            raise NotFound(f"no model version {version!r}") from exc
        except InUse as exc:
            raise Conflict(str(exc)) from exc
    return DeletedVersion(deleted=version, freed_bytes=freed)
