"""POST /v1/feedback (what an image really was; end users send it), and /admin/feedback:
live accuracy per version, the kept answers to review, forgetting them."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from app import paths
from app.deps import AdminDep, StateDep
from app.errors import (
    AppError,
    NotFound,
    Overloaded,
    Unauthorized,
    ValidationFailed,
    responses,
)
from app.feedback import FeedbackError
from app.middleware import bearer_matches
from app.schemas import PREDICTION_ID
from app.state import AppState


class _PredictionIdConvertor(Convertor[str]):
    """Routes match only a 32-hex id, so /admin/feedback/items is never taken for one (a
    DELETE of it is 405, not an unknown item)."""

    regex = "[0-9a-f]{32}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("prediction_id", _PredictionIdConvertor())
router = APIRouter(tags=["feedback"])
admin = APIRouter(
    prefix=paths.ADMIN_PREFIX + "/feedback", tags=["admin"], dependencies=[AdminDep],
    responses=responses(401, 503),
)  # fmt: skip

PredictionId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$",
                                   examples=["8f14e45fceea167a5a36dedd4bea2543"])]  # fmt: skip
HISTORY = 20  # labels an answer to POST /v1/feedback lists (GET /admin/feedback/{id}: all)
MAX_LABEL_WRITES = 256  # label writes waiting for the database at once; past it: 429


class FeedbackDisabled(AppError):
    status, code = 503, "feedback_disabled"


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"prediction_id": "8f14e45fceea167a5a36dedd4bea2543", "label": "tiger cat"}]})  # fmt: skip

    prediction_id: str = PREDICTION_ID
    label: str = Field(min_length=1, max_length=200,
                       description="what the image really is: one of the answering version's "
                       "labels")  # fmt: skip


class Scored(BaseModel):
    label: str
    index: int
    probability: float


class FeedbackItem(BaseModel):
    prediction_id: str
    version: str = Field(description="the version that answered")
    predicted: str = Field(description="its top-1 label")
    predictions: list[Scored] = Field(description="its top-5 (or every class, if fewer)")
    created_at: float
    label: str | None = Field(description="the label sent back (the latest), or null")
    labelled_at: float | None
    split: str | None = Field(description="train or holdout: drawn once, at the first "
                              "labelling, and never changed (holdout: no version trains on it)")  # fmt: skip
    correct: bool | None = Field(description="whether the top-1 was the label")
    in_top5: bool | None
    image_url: str


class FeedbackAnswer(FeedbackItem):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "prediction_id": "8f14e45fceea167a5a36dedd4bea2543", "version": "20261127-031500-ab12",
        "predicted": "tabby", "predictions": [
            {"label": "tabby", "index": 281, "probability": 0.62},
            {"label": "tiger cat", "index": 282, "probability": 0.31}],
        "created_at": 1796160000.0, "label": "tiger cat", "labelled_at": 1796160042.5,
        "split": "train", "correct": False, "in_top5": True,
        "image_url": "/admin/feedback/8f14e45fceea167a5a36dedd4bea2543/image",
        "previous_label": None, "history": [{"label": "tiger cat", "at": 1796160042.5}]}]})  # fmt: skip

    previous_label: str | None = Field(description="the label this one replaced, if any")
    history: list[dict[str, Any]] = Field(description="the labels sent for it, oldest first "
                                          "(the last 20 in the answer to POST /v1/feedback)")  # fmt: skip


class ItemPage(BaseModel):
    total: int = Field(description="answers matching the filters")
    limit: int
    offset: int
    items: list[FeedbackItem]


class Forgotten(BaseModel):
    deleted: int
    freed_bytes: int


class PurgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra={"examples": [
        {"older_than_s": 2_592_000}]})  # fmt: skip

    older_than_s: float = Field(ge=0, le=1e10, description="forget every kept answer, "
                                "labelled or not, older than this many seconds (0: all)")  # fmt: skip


def item_out(state: AppState, d: dict[str, Any]) -> dict[str, Any]:
    labels = state.feedback.version_labels(d["version"]) or []
    preds = [{"label": labels[i] if i < len(labels) else str(i), "index": i, "probability": p}
             for i, p in d["predictions"]]  # fmt: skip
    label = d["label"]
    top = [p["label"] for p in preds]
    return {
        "prediction_id": d["prediction_id"], "version": d["version"],
        "predicted": d["predicted"], "predictions": preds, "created_at": d["created_at"],
        "label": label, "labelled_at": d["labelled_at"], "split": d["split"],
        "correct": None if label is None else top[:1] == [label],
        "in_top5": None if label is None else label in top[:5],
        "image_url": f"{paths.ADMIN_PREFIX}/feedback/{d['prediction_id']}/image",
    }  # fmt: skip


def _from_feedback_error(exc: FeedbackError) -> AppError:
    if exc.kind == "bad_label":
        return ValidationFailed(exc.message, details=exc.details)
    return NotFound(exc.message)


async def feedback_gate(request: Request, state: StateDep) -> None:
    """Before the body is read: 503 while feedback is off, 401 without the feedback token
    (when ALEXNET_FEEDBACK_TOKEN is set; compared in constant time)."""
    if state.keeper is None and state.settings.model_dir is not None:
        raise FeedbackDisabled("feedback is off on this server: it serves a version folder "
                               "read-only (ALEXNET_MODEL_DIR) and keeps nothing")  # fmt: skip
    if state.keeper is None:
        raise FeedbackDisabled("feedback is off on this server: ALEXNET_FEEDBACK=true turns it "
                               "on (it keeps what users upload)")  # fmt: skip
    token = state.settings.feedback_token
    if token is None or not token.get_secret_value():
        return
    if not bearer_matches(token, request.headers.get("authorization")):
        raise Unauthorized("feedback needs a bearer token (ALEXNET_FEEDBACK_TOKEN)")


class FeedbackInfo(BaseModel):
    enabled: bool = Field(description="whether this server keeps answers for feedback "
                          "(ALEXNET_FEEDBACK)")  # fmt: skip
    token_required: bool = Field(description="whether POST /v1/feedback needs a bearer token "
                                 "(ALEXNET_FEEDBACK_TOKEN)")  # fmt: skip


@router.get(paths.FEEDBACK, response_model=FeedbackInfo,
            summary="Whether feedback is on here (the upload page asks)")  # fmt: skip
async def feedback_info(state: StateDep) -> FeedbackInfo:
    token = state.settings.feedback_token
    return FeedbackInfo(enabled=state.keeper is not None,
                        token_required=bool(token and token.get_secret_value()))  # fmt: skip


@router.post(
    paths.FEEDBACK, summary="Say what an answered image really was",
    response_model=FeedbackAnswer, dependencies=[Depends(feedback_gate)],
    responses=responses(400, 401, 404, 413, 422, 429, 503, examples={
        400: ("invalid_request", "There was an error parsing the body"),
        404: ("not_found", "no kept answer 8f14e45fceea167a5a36dedd4bea2543: unknown, expired "
                           "(...), deleted, or never kept"),
        422: ("validation_error", "label: 'tigre cat' is not one of the 1000 labels of version "
                                  "20261127-031500-ab12, which gave this answer; did you mean "
                                  "'tiger cat'?"),
        413: ("payload_too_large", "request body is larger than 4096 bytes"),
        503: ("feedback_disabled", "feedback is off on this server: ALEXNET_FEEDBACK=true "
                                   "turns it on")}),
)  # fmt: skip
async def send_feedback(body: FeedbackRequest, state: StateDep) -> dict[str, Any]:
    """`prediction_id` from an answer of `/v1/classify` (or an entry of the batch), `label`
    one of the labels of the version that gave it (even one no longer served). A second
    label for the same answer replaces the first; the history keeps both. Needs no admin
    token (end users send it), only `ALEXNET_FEEDBACK_TOKEN` when that is set. 503
    `feedback_disabled` unless the server runs with `ALEXNET_FEEDBACK=true`."""
    if state.feedback_writes >= MAX_LABEL_WRITES:
        raise Overloaded(f"{state.feedback_writes} feedback writes are waiting; retry after "
                         "1 s", retry_after_s=1)  # fmt: skip
    state.feedback_writes += 1
    try:
        old, new, history = await asyncio.get_running_loop().run_in_executor(
            state.feedback_executor, _label, state, body.prediction_id, body.label
        )
    except FeedbackError as exc:
        raise _from_feedback_error(exc) from exc
    finally:
        state.feedback_writes -= 1
    out = item_out(state, new)
    outcome = "right" if out["correct"] else "top5" if out["in_top5"] else "wrong"
    state.metrics.feedback_labels.labels(new["version"], outcome).inc()
    return {**out, "previous_label": old, "history": history}


def _label(state: AppState, prediction_id: str,
           label: str) -> tuple[str | None, dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    assert state.keeper is not None
    state.keeper.wait_written(prediction_id, 5.0)  # an answer of a moment ago
    old, new = state.feedback.label(prediction_id, label)
    return old, new, state.feedback.history(prediction_id, last=HISTORY)


_SUMMARY_EXAMPLE = {
    "enabled": True, "kept": 5120, "labelled": 312, "unlabelled": 4808, "bytes": 402_653_184,
    "max_bytes": 1_073_741_824, "per_label": {"tiger cat": 41, "tabby": 37},
    "splits": {"train": 262, "holdout": 50},
    "confusion": [{"predicted": "tabby", "label": "tiger cat", "count": 23},
                  {"predicted": "tabby", "label": "tabby", "count": 19}],
    "versions": [{"version": "20261127-031500-ab12", "labelled": 312,
                  "top1": {"correct": 187, "accuracy": 0.599, "low": 0.544, "high": 0.652},
                  "top5": {"correct": 291, "accuracy": 0.933, "low": 0.900, "high": 0.955}}],
    "retention_days": 30.0, "serving": "20261127-031500-ab12",
}  # fmt: skip


@admin.get("", summary="Live accuracy on labelled traffic, per version",
           responses={200: {"content": {"application/json": {"example": _SUMMARY_EXAMPLE}}}})  # fmt: skip
async def feedback_summary(state: StateDep) -> dict[str, Any]:
    """Kept, labelled and unlabelled answers and their bytes; labels sent per label; the
    confusion between each answer's top-1 and the label sent (largest cells first); and per
    version that answered, top-1 and top-5 accuracy on its labelled answers with 95% Wilson
    intervals. `enabled` says whether this server keeps new answers."""
    summary = await asyncio.to_thread(state.feedback.summary)
    return {"enabled": state.keeper is not None, **summary,
            "retention_days": state.settings.feedback_retention_days,
            "serving": state.registry.current.version if state.registry.current else None}  # fmt: skip


_VERSION = "only this version's answers"
_WRONG = "only labelled answers whose top-1 was not the label"
_LABELLED = "only labelled (true) or unlabelled (false) answers"


@admin.get("/items", response_model=ItemPage, summary="Kept answers, newest first")
async def feedback_items(
    state: StateDep,
    label: Annotated[str | None, Query(max_length=200, description="only this label")] = None,
    version: Annotated[str | None, Query(max_length=64, description=_VERSION)] = None,
    wrong: Annotated[bool, Query(description=_WRONG)] = False,
    labelled: Annotated[bool | None, Query(description=_LABELLED)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> ItemPage:
    rows, total = await asyncio.to_thread(state.feedback.items, label=label, version=version,
                                          wrong=wrong, labelled=labelled, limit=limit,
                                          offset=offset)  # fmt: skip
    return ItemPage(total=total, limit=limit, offset=offset,
                    items=[FeedbackItem(**item_out(state, r)) for r in rows])  # fmt: skip


@admin.post("/purge", response_model=Forgotten, summary="Forget kept answers by age",
            responses=responses(400, 413, 422, examples={
                400: ("invalid_request", "There was an error parsing the body"),
                413: ("payload_too_large", "request body is larger than 1048576 bytes")}))  # fmt: skip
async def feedback_purge(body: PurgeRequest, state: StateDep) -> Forgotten:
    """Every kept answer older than `older_than_s` (labelled ones too), its label history,
    and its image unless a newer answer has the same bytes."""
    n, freed = await asyncio.to_thread(state.feedback.purge, body.older_than_s)
    return Forgotten(deleted=n, freed_bytes=freed)


@admin.get("/{prediction_id:prediction_id}", response_model=FeedbackAnswer, summary="One kept answer",
           responses=responses(404))  # fmt: skip
async def feedback_item(prediction_id: PredictionId, state: StateDep) -> dict[str, Any]:
    d = await asyncio.to_thread(state.feedback.get, prediction_id)
    if d is None:
        raise NotFound(f"no kept answer {prediction_id}")
    history = await asyncio.to_thread(state.feedback.history, prediction_id)
    return {**item_out(state, d), "previous_label": None, "history": history}


@admin.get(
    "/{prediction_id:prediction_id}/image", summary="The image of a kept answer", response_class=Response,
    responses={**responses(404), 200: {"content": {"image/*": {}}}},
)  # fmt: skip
async def feedback_image(prediction_id: PredictionId, state: StateDep) -> Response:
    try:
        data, media = await asyncio.to_thread(state.feedback.image, prediction_id)
    except FeedbackError as exc:
        raise _from_feedback_error(exc) from exc
    return Response(data, media_type=media, headers={"Cache-Control": "no-store"})


@admin.delete("/{prediction_id:prediction_id}", response_model=Forgotten, summary="Forget one kept answer",
              responses=responses(404))  # fmt: skip
async def feedback_delete(prediction_id: PredictionId, state: StateDep) -> Forgotten:
    """Its record, label history and image (unless another answer has the same bytes). A
    job already reading it keeps its own snapshot until it ends."""
    try:
        freed = await asyncio.to_thread(state.feedback.delete, prediction_id)
    except FeedbackError as exc:
        raise _from_feedback_error(exc) from exc
    return Forgotten(deleted=1, freed_bytes=freed)
