"""POST /v1/classify and /v1/classify/batch."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile

from app import paths
from app.batching import BatcherError
from app.deps import StateDep
from app.errors import (
    AppError,
    ClientClosedRequest,
    RequestTimeout,
    ValidationFailed,
    from_batcher_error,
    from_image_error,
    responses,
)
from app.intake import is_raw_body, media_type, read_body, read_form, read_upload
from app.registry import LoadedModel
from app.schemas import (
    BatchResponse,
    ClassifyResponse,
    FileResult,
    ModelRef,
    Prediction,
    multipart_body,
    new_prediction_id,
)
from app.state import AppState
from model.engine import default_top_k
from model.images import ImageError
from model.predictor import Row

router = APIRouter(tags=["classify"])

TopK = Annotated[
    int | None,
    Query(
        ge=1,
        le=1000,
        description="how many classes to return (1..num_classes); default "
        "5, or every class when the model has fewer",
    ),
]


MinConfidence = Annotated[
    float | None,
    Query(
        gt=0,
        le=1,
        description="below this top-1 probability the answer carries uncertain: true (the "
        "predictions are still listed); default ALEXNET_MIN_CONFIDENCE (off when unset)",
    ),
]


async def _watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_result(request: Request, fut: asyncio.Future[Row], deadline: float) -> Row:
    """Wait for `fut` until the deadline; a client that disconnects cancels its item, so
    the batcher skips it."""
    loop = asyncio.get_running_loop()
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    waitables: set[asyncio.Future[Any]] = {fut, watcher}
    try:
        done, _ = await asyncio.wait(waitables, timeout=max(0.0, deadline - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if fut in done:
            return fut.result()
        fut.cancel()
        if watcher in done:
            raise ClientClosedRequest("the client disconnected")
        raise RequestTimeout("the request did not finish within the request timeout")
    finally:
        watcher.cancel()


def _predictions(loaded: LoadedModel, row: Row) -> list[Prediction]:
    labels = loaded.card.labels
    return [Prediction(label=labels[i], index=i, probability=p) for i, p in row]


def _model_ref(loaded: LoadedModel) -> ModelRef:
    return ModelRef(name=loaded.card.arch, version=loaded.version)


def _top_k(loaded: LoadedModel, top_k: int | None) -> int:
    """The default is 5, or every class of a model with fewer; an explicit top_k above
    num_classes is the client's mistake (422)."""
    n = loaded.card.num_classes
    if top_k is None:
        return default_top_k(n)
    if top_k > n:
        raise ValidationFailed(
            f"top_k: must be at most {n} for model {loaded.version}",
            details=[{"loc": ["query", "top_k"], "msg": "larger than num_classes"}],
        )
    return top_k


async def admit(state: AppState, request: Request) -> None:
    """Shed load before parsing or decoding anything. The refused body is still read (and
    dropped, within the body limits) so the 429 goes out on a connection the client can
    read it from and reuse: closing with unread bytes would reset it."""
    try:
        state.batcher.admit()
    except BatcherError as exc:
        async for _ in request.stream():
            pass
        raise from_batcher_error(exc) from exc


async def classify_bytes(
    state: AppState, request: Request, loaded: LoadedModel, data: bytes, top_k: int, deadline: float
) -> Row:
    t0 = time.perf_counter()
    try:
        with state.batcher.incoming():
            tensor = await state.decoder(data, loaded.predictor)
    except ImageError as exc:
        raise from_image_error(exc) from exc
    finally:
        state.metrics.stage.labels("decode").observe(time.perf_counter() - t0)
    return await classify_tensor(state, request, loaded, tensor, top_k, deadline)


async def classify_tensor(state: AppState, request: Request, loaded: LoadedModel,
                          tensor: torch.Tensor, top_k: int, deadline: float) -> Row:  # fmt: skip
    """One input (3, S, S) for `loaded` (uint8, or floats in [0, 1]) through the batcher."""
    try:
        fut = state.batcher.submit(tensor, loaded, top_k=top_k, deadline=deadline)
        state.metrics.queue_depth.set(state.batcher.depth)
        row = await wait_result(request, fut, deadline)
    except BatcherError as exc:
        raise from_batcher_error(exc) from exc
    if row:
        state.metrics.predictions.labels(loaded.card.labels[row[0][0]]).inc()
    return row


def confidence_threshold(state: AppState, min_confidence: float | None) -> float | None:
    return min_confidence if min_confidence is not None else state.settings.min_confidence


def judge(state: AppState, loaded: LoadedModel, row: Row, threshold: float | None) -> bool:
    """Whether the answer is "not sure", and its confidence signals in the metrics."""
    top1, p = row[0]
    uncertain = threshold is not None and p < threshold
    c = loaded.card
    state.metrics.answered(c.version, c.label_distribution, c.num_classes, top1, p, uncertain)
    return uncertain


@router.post(
    paths.CLASSIFY,
    summary="Classify one image",
    response_model=ClassifyResponse,
    responses=responses(400, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=multipart_body("file", many=False, raw=True),
)
async def classify(request: Request, state: StateDep, top_k: TopK = None,
                   min_confidence: MinConfidence = None) -> ClassifyResponse:  # fmt: skip
    """Upload one image (JPEG, PNG, WebP, GIF or BMP; the bytes decide, not the filename or
    the declared type) as the multipart field `file`, or as the request body itself with
    `Content-Type: image/jpeg` (any `image/*`) or `application/octet-stream`: the same
    limits and errors, without a form to parse. Answers the top-k classes with softmax
    probabilities and the model version that answered."""
    deadline = asyncio.get_running_loop().time() + state.settings.request_timeout_s
    loaded = state.model
    k = _top_k(loaded, top_k)
    await admit(state, request)
    limit = state.settings.max_upload_bytes
    if is_raw_body(media_type(request)):  # the image itself is the body: no form to parse
        data = await read_body(request, limit)
        row = await classify_bytes(state, request, loaded, data,
                                    state.answer_top_k(loaded, k), deadline)  # fmt: skip
    else:
        form = await read_form(request, max_files=1, max_file_bytes=limit)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ValidationFailed("file: a multipart file field named 'file' is required",
                                       details=[{"loc": ["body", "file"], "msg": "Field required"}])  # fmt: skip
            data = await read_upload(upload, limit)
            row = await classify_bytes(state, request, loaded, data,
                                        state.answer_top_k(loaded, k), deadline)  # fmt: skip
        finally:
            await form.close()
    pid = new_prediction_id()
    state.keep(pid, data, loaded, row)
    threshold = confidence_threshold(state, min_confidence)
    return ClassifyResponse(model=_model_ref(loaded), prediction_id=pid,
                            predictions=_predictions(loaded, row[:k]),
                            uncertain=judge(state, loaded, row, threshold),
                            min_confidence=threshold)  # fmt: skip


@router.post(
    paths.CLASSIFY_BATCH,
    summary="Classify several images, each answered on its own",
    response_model=BatchResponse,
    response_model_exclude_none=True,
    responses=responses(400, 413, 415, 422, 429, 503, 504),
    openapi_extra=multipart_body("files", many=True),
)
async def classify_batch(request: Request, state: StateDep, top_k: TopK = None,
                         min_confidence: MinConfidence = None) -> BatchResponse:  # fmt: skip
    """Upload up to `max_files` images as repeated multipart fields `files`. A bad file gets
    an `error` entry in its place and does not fail the others."""
    deadline = asyncio.get_running_loop().time() + state.settings.request_timeout_s
    loaded = state.model
    k = _top_k(loaded, top_k)
    threshold = confidence_threshold(state, min_confidence)
    await admit(state, request)
    form = await read_form(
        request, max_files=state.settings.max_files, max_file_bytes=state.settings.max_upload_bytes
    )
    try:
        uploads = [u for u in form.getlist("files") if isinstance(u, UploadFile)]
        if not uploads:
            raise ValidationFailed("files: at least one multipart file field named 'files' is required",
                                   details=[{"loc": ["body", "files"], "msg": "Field required"}])  # fmt: skip

        async def one(upload: UploadFile) -> FileResult:
            name = upload.filename or "file"
            try:
                data = await read_upload(upload, state.settings.max_upload_bytes)
                row = await classify_bytes(state, request, loaded, data,
                                            state.answer_top_k(loaded, k), deadline)  # fmt: skip
            except AppError as err:
                # same label scheme as whole-request rejections (MetricsMiddleware): status
                state.metrics.rejections.labels(str(err.status)).inc()
                return FileResult(filename=name, error=err.body()["error"])
            pid = new_prediction_id()
            state.keep(pid, data, loaded, row)
            return FileResult(filename=name, prediction_id=pid,
                              predictions=_predictions(loaded, row[:k]),
                              uncertain=judge(state, loaded, row, threshold))  # fmt: skip

        results = await asyncio.gather(*(one(u) for u in uploads))
    finally:
        await form.close()
    return BatchResponse(model=_model_ref(loaded), results=list(results),
                         min_confidence=threshold)  # fmt: skip
