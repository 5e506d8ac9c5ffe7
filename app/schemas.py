"""Response bodies of the public API (they make the OpenAPI schema)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from app.errors import ErrorDetail
from app.jobs.store import Activate
from model.config import TrainConfig
from model.run import launch_problem

if TYPE_CHECKING:
    from app.jobs.store import Job


class Prediction(BaseModel):
    label: str = Field(examples=["tabby"])
    index: int = Field(examples=[281])
    probability: float = Field(ge=0, le=1, examples=[0.8312])


class ModelRef(BaseModel):
    name: str = Field(examples=["alexnet"])
    version: str = Field(examples=["20261127-031500-ab12"])


PREDICTION_ID = Field(
    description="this answer's id: 128 random bits in hex, unique and unguessable (the key "
    "for feedback on it)",
    pattern=r"^[0-9a-f]{32}$", examples=["8f14e45fceea167a5a36dedd4bea2543"],
)  # fmt: skip


def new_prediction_id() -> str:
    """128 bits from the OS's CSPRNG."""
    return secrets.token_hex(16)


UNCERTAIN = Field(False, description="the top-1 probability is below min_confidence (the "
                  "request's, else ALEXNET_MIN_CONFIDENCE): the model is not sure; the "
                  "predictions are still listed")  # fmt: skip


def _min_confidence() -> Any:
    return Field(None, description="the threshold the answers were judged against (null: "
                 "none)", examples=[0.5])  # fmt: skip


class ClassifyResponse(BaseModel):
    model: ModelRef
    prediction_id: str = PREDICTION_ID
    predictions: list[Prediction]
    uncertain: bool = UNCERTAIN
    min_confidence: float | None = _min_confidence()

    model_config = {"json_schema_extra": {"examples": [{
        "model": {"name": "alexnet", "version": "20261127-031500-ab12"},
        "prediction_id": "8f14e45fceea167a5a36dedd4bea2543",
        "predictions": [{"label": "tabby", "index": 281, "probability": 0.83},
                        {"label": "tiger cat", "index": 282, "probability": 0.11}],
        "uncertain": False, "min_confidence": 0.5,
    }]}}  # fmt: skip


class FileResult(BaseModel):
    filename: str
    prediction_id: str | None = Field(None, description="this file's answer's id (absent "
                                      "for a file that got an error)", pattern=r"^[0-9a-f]{32}$")  # fmt: skip
    predictions: list[Prediction] | None = None
    uncertain: bool | None = Field(None, description="as for one image (absent for a file "
                                   "that got an error)")  # fmt: skip
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[FileResult]
    min_confidence: float | None = _min_confidence()

    model_config = {"json_schema_extra": {"examples": [{
        "model": {"name": "alexnet", "version": "20261127-031500-ab12"},
        "results": [
            {"filename": "cat.jpg", "prediction_id": "8f14e45fceea167a5a36dedd4bea2543",
             "predictions": [
                {"label": "tabby", "index": 281, "probability": 0.83}], "uncertain": False},
            {"filename": "notes.txt", "error": {
                "code": "unsupported_media_type", "message": "not an accepted image format",
                "details": None}},
        ],
    }]}}  # fmt: skip


class VersionSummary(BaseModel):
    version: str
    arch: str
    num_classes: int
    image_size: int
    dataset: str | None
    source: str
    parent: str | None
    created_at: str
    metrics: dict[str, Any]
    size_bytes: int = Field(description="bytes on disk (weights, model.json, probes, diagram)")
    calibrated: bool = Field(False, description="carries a fitted temperature "
                             "(GET /v1/models/{version}/reliability.png)")  # fmt: skip
    active: bool
    serving: bool


class DeletedVersion(BaseModel):
    deleted: str = Field(examples=["20261127-031500-ab12"])
    freed_bytes: int = Field(examples=[228_405_912])


class ModelsResponse(BaseModel):
    active: str | None = Field(description="the version in ACTIVE on disk (with "
                               "ALEXNET_MODEL_DIR: the one version of that folder)")  # fmt: skip
    serving: str | None = Field(description="the version answering requests now")
    versions: list[VersionSummary]
    model_dir: str | None = Field(None, description="ALEXNET_MODEL_DIR: the one version folder "
                                  "this server serves, read-only; null when it serves "
                                  "ALEXNET_HOME's versions")  # fmt: skip


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    version: str | None = None
    device: str | None = None
    precision: str | None = None


def multipart_body(field: str, *, many: bool, raw: bool = False) -> dict[str, Any]:
    """An OpenAPI requestBody for image uploads (the route parses the form itself, so
    that the limits apply while the body streams in). `raw`: the image may also be the
    body itself (`image/*` or `application/octet-stream`)."""
    item = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": item} if many else item
    content: dict[str, Any] = {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: schema}}}}  # fmt: skip
    if raw:
        for media in ("image/*", "application/octet-stream"):
            content[media] = {"schema": dict(item)}
    return {"requestBody": {"required": True, "content": content}}


# How torchrun starts a job's ranks (app/training.py: Launch), beside nproc_per_node.
LAUNCH_FIELDS: Final = ("nnodes", "max_restarts", "rdzv_endpoint")


class JobRequest(TrainConfig):
    """POST /admin/jobs: the `alexnet train` options in snake_case, plus what to do with
    the result."""

    activate: Activate = Field(
        "if_better",
        description="if_better: activate when, on the same frozen holdout of this job's "
        "dataset, its top-1 beats the served version's (same labels) by more than chance "
        "(McNemar's exact test, ALEXNET_PROMOTION_ALPHA), or when nothing is served; "
        "always; never",
    )
    nproc_per_node: int = Field(1, ge=1, le=64, description="processes (GPUs); torchrun if > 1")
    nnodes: str = Field(
        "1", pattern=r"^[1-9][0-9]*(:[1-9][0-9]*)?$",
        description="nodes, N or MIN:MAX (elastic); above 1 the other nodes run `alexnet "
        "train` with the same options and run folder, meeting at rdzv_endpoint",
    )  # fmt: skip
    max_restarts: int = Field(
        0, ge=0, le=100,
        description="torchrun restarts every rank up to this many times after one dies; they "
        "go on from the last saved state (checkpoint_every_steps)",
    )  # fmt: skip
    rdzv_endpoint: str | None = Field(
        None, max_length=255, pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$", validate_default=True,
        description="HOST:PORT of the c10d rendezvous the nodes meet at",
    )  # fmt: skip
    include_feedback: bool = Field(
        False,
        description="add labelled feedback (POST /v1/feedback) to the data: its train share "
        "joins the dataset's train and validation images, its holdout stays out. Or "
        '"dataset": "feedback" to train on labelled feedback alone. Either is a fine-tune '
        "from `base` (default: the served version) and its labels; the job reads a snapshot "
        "taken now",
    )

    model_config = {"json_schema_extra": {"examples": [{
        "dataset": "synthetic", "image_size": 64, "batch_size": 32, "epochs": 10,
        "dropout": 0.0, "activate": "if_better"}]}}  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _feedback_fine_tunes_the_served_version(cls, data: Any) -> Any:
        """Labelled feedback is the served version's traffic: base defaults to `active`."""
        if (
            isinstance(data, dict)
            and data.get("base") is None
            and (data.get("dataset") == "feedback" or data.get("include_feedback") is True)
        ):
            return {**data, "base": "active"}
        return data

    # What `alexnet train` would refuse (model/run.py: launch_problem), refused here (422,
    # at the field at fault), not when the job runs.
    @field_validator("nnodes")
    @classmethod
    def _nnodes_in_order(cls, v: str) -> str:
        problem = launch_problem(v, 0, "-:0")
        if problem is not None:
            raise ValueError(problem[1])
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _several_nodes_meet_somewhere(cls, v: str | None, info: ValidationInfo) -> str | None:
        problem = launch_problem(info.data.get("nnodes", "1"), 0, v)
        if problem is not None and problem[0] == "rdzv_endpoint":
            raise ValueError(problem[1])
        return v

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(
            self.model_dump(
                exclude={"activate", "nproc_per_node", "include_feedback", *LAUNCH_FIELDS}
            )
        )


class JobProgress(BaseModel):
    epoch: int = Field(description="the epoch running (or last finished), from 1")
    epochs: int
    step: int = Field(description="steps done in this epoch")
    steps: int = Field(description="steps per epoch")
    images_per_s: float | None = None
    eta_s: float | None = Field(None, description="seconds left, at the current rate")


class JobOut(BaseModel):
    id: str = Field(examples=["3f2a9c1b7d4e"])
    status: str = Field(
        description="queued, running, succeeded, failed, cancelled or interrupted",
        examples=["running"],
    )
    source: str = Field(description="api, or bootstrap for the embedded default")
    config: dict[str, Any] = Field(description="the full training configuration")
    activate: str
    nproc_per_node: int
    launch: dict[str, Any] | None = Field(
        None, description="torchrun's nnodes, max_restarts and rdzv_endpoint, where given"
    )
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: JobProgress
    history: list[dict[str, Any]] = Field(
        description="per epoch: train_loss, val_loss, val_top1, val_top5, lr, grad_norm, "
        "images_per_s, epoch_time_s"
    )
    result_version: str | None
    metrics: dict[str, Any] | None
    activated: bool
    activation: str | None = Field(
        description="why the result was or was not activated, in words (with if_better: "
        "both holdout accuracies, the holdout size and the p-value)"
    )
    promotion: dict[str, Any] | None = Field(
        None,
        description="if_better's judgement: policy, decision, holdout_size, dataset, "
        "candidate and served {version, top1}, only_candidate_right, only_served_right, "
        "p_value, alpha, precision, note",
    )
    error: str | None
    tracking: dict[str, Any] | None = Field(
        None,
        description="where the run is also on record, per backend: mlflow {status, uri, "
        "experiment_id, run_id, error}, tensorboard {status, logdir, error}; status is ok or "
        "failed (training goes on without a tracker that fails)",
    )
    attempts: int = Field(description="how many times a process ran it (resumes count)")
    state_purged: bool = Field(
        False, description="its resumable state was deleted (purge, or ALEXNET_KEEP_JOB_STATE)"
    )

    model_config = {"json_schema_extra": {"examples": [{
        "id": "3f2a9c1b7d4e", "status": "running", "source": "api",
        "config": {"dataset": "synthetic", "epochs": 10, "image_size": 64, "batch_size": 32},
        "activate": "if_better", "nproc_per_node": 1, "created_at": 1795760100.0,
        "started_at": 1795760101.2, "finished_at": None,
        "progress": {"epoch": 3, "epochs": 10, "step": 41, "steps": 100,
                     "images_per_s": 121.5, "eta_s": 190.0},
        "history": [{"epoch": 1, "train_loss": 2.21, "val_loss": 1.91, "val_top1": 0.21,
                     "val_top5": 0.83, "lr": 0.01}],
        "result_version": None, "metrics": None, "activated": False, "activation": None,
        "promotion": None, "error": None,
        "tracking": {"mlflow": {"status": "ok", "uri": "http://mlflow:5000",
                                "experiment_id": "1", "run_id": "5c0ffee5c0ffee", "error": None}},
        "attempts": 1, "state_purged": False}]}}  # fmt: skip

    @classmethod
    def of(cls, job: Job) -> JobOut:
        """A job record as the API shows it (the pid and control flags stay inside)."""
        fields = {k: getattr(job, k) for k in cls.model_fields if hasattr(job, k)}
        progress = JobProgress(epoch=job.epoch, epochs=job.epochs or job.config.get("epochs", 0),
                               step=job.step, steps=job.steps, images_per_s=job.images_per_s,
                               eta_s=job.eta_s)  # fmt: skip
        return cls(**fields, progress=progress, state_purged=job.purged_at is not None)


class JobList(BaseModel):
    jobs: list[JobOut]


class ActivateResponse(BaseModel):
    active: str = Field(examples=["20261127-031500-ab12"])
    previous: str | None = Field(description="activate this one to roll back")
    model: dict[str, Any] = Field(description="the new version's model.json, device, precision")
