"""The Open Inference Protocol (KServe V2) over REST, beside our own API: the same batcher,
admission control, limits and answers as /v1/classify. Errors are the protocol's own
`{"error": message}` (app/errors.py: `AppError.body`), with 429 and 503 carrying
Retry-After as elsewhere.

One model, `ALEXNET_MODEL_NAME`, whose one version is the served one. Its inputs (exactly
one per request):
- `image` BYTES [N] or [N, 1]: encoded image files, decoded and checked like uploads;
- `input` UINT8 [N, 3, S, S]: pixels after the version's resize and crop, or FP32
  [N, 3, S, S]: those normalised with the version's mean and std (what an ONNX export of
  the version takes, `alexnet export`).
Its output `probabilities` FP32 [N, num_classes] (the version's calibrated softmax), or
with `parameters: {"classification": k}` BYTES [N, k] "score:index:label" (as Triton does).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any, Final

import numpy as np
import torch
from fastapi import APIRouter, Header, Request, Response

from app import oip, paths
from app.batching import BatcherError
from app.deps import StateDep
from app.errors import (
    RETRY_AFTER_HEADER,
    RETRY_AFTER_STATUSES,
    AppError,
    BadRequest,
    ImageTooLargeError,
    NotFound,
    PayloadTooLarge,
    TooManyFiles,
    UnsupportedMediaType,
    from_batcher_error,
)
from app.intake import infer_body_limit
from app.registry import LoadedModel
from app.routes.classify import admit, classify_bytes, classify_tensor, confidence_threshold, judge
from app.schemas import new_prediction_id
from app.state import AppState
from model.predictor import Row

router = APIRouter(prefix=paths.OIP_PREFIX, tags=["open inference protocol"])

EXTENSIONS: Final = ["binary_tensor_data", "classification"]
OUTPUT: Final = "probabilities"

_EXAMPLES: dict[int, str] = {
    400: "input 'image': shape [2] has 2 elements, data has 1",
    404: "unknown model 'resnet': this server serves 'alexnet'",
    413: "request body is larger than 447392426 bytes",
    415: "input 'image' element 0: not an accepted image format",
    429: "the queue is full (256 waiting); retry later",
    503: "no model is loaded yet (loading)",
    504: "the request did not finish within the request timeout",
}


def protocol_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the protocol's error shape."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": oip.ProtocolError,
            "description": "the protocol's error",
            "content": {"application/json": {"example": {"error": _EXAMPLES[status]}}},
        }
        if status in RETRY_AFTER_STATUSES:
            entry["headers"] = RETRY_AFTER_HEADER
        out[status] = entry
    return out


def _server_version() -> str:
    try:
        return package_version("alexnet-service")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was not installed
        return "0"


def _served(state: AppState, name: str, version: str | None) -> LoadedModel:
    """The served version under `name`, or a 404 that says what is served."""
    expected = state.settings.model_name
    if name != expected:
        raise NotFound(f"unknown model {name[:100]!r}: this server serves {expected!r}")
    loaded = state.model  # 503 with Retry-After until one is loaded
    if version is not None and version != loaded.version:
        raise NotFound(f"model {name!r} version {version[:100]!r} is not being served; "
                       f"the served version is {loaded.version!r}")  # fmt: skip
    return loaded


# ----------------------------------------------------------------------------- health


@router.get("/health/live", summary="OIP: the server is live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="OIP: the server is ready (a model is served)",
            responses=protocol_responses(503))  # fmt: skip
async def ready(state: StateDep) -> dict[str, bool]:
    _ = state.model
    return {"ready": True}


@router.get("", summary="OIP: server metadata", response_model=oip.ServerMetadata)
async def server_metadata() -> oip.ServerMetadata:
    return oip.ServerMetadata(name="alexnet-service", version=_server_version(),
                              extensions=EXTENSIONS)  # fmt: skip


# ----------------------------------------------------------------------------- models


def _metadata(state: AppState, loaded: LoadedModel) -> oip.ModelMetadata:
    card = loaded.card
    s = card.preprocessing.image_size
    pre = card.preprocessing
    return oip.ModelMetadata(
        name=state.settings.model_name,
        versions=[loaded.version],
        platform="pytorch",
        inputs=[
            oip.TensorMetadata(name="image", datatype="BYTES", shape=[-1]),
            oip.TensorMetadata(name="input", datatype="FP32", shape=[-1, 3, s, s]),
        ],
        outputs=[oip.TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1, card.num_classes])],
        parameters={
            "arch": card.arch,
            "num_classes": card.num_classes,
            "image_size": s,
            "resize_size": pre.resize_size,
            "resize": pre.resize,
            "mean": ",".join(f"{m:g}" for m in pre.mean),
            "std": ",".join(f"{m:g}" for m in pre.std),
            "temperature": card.temperature,
            "input_note": "one input per request: image (BYTES [N] or [N, 1], encoded files); "
            "or input, UINT8 [N, 3, S, S] pixels after the resize and crop, or FP32 the same "
            "normalised with mean and std",
        },
    )


MODEL_DOC = "OIP: the model's inputs and outputs (the served version)"


@router.get("/models/{name}", summary=MODEL_DOC, response_model=oip.ModelMetadata,
            responses=protocol_responses(404, 503))  # fmt: skip
async def model_metadata(name: str, state: StateDep) -> oip.ModelMetadata:
    return _metadata(state, _served(state, name, None))


@router.get("/models/{name}/versions/{version}", summary=MODEL_DOC,
            response_model=oip.ModelMetadata, responses=protocol_responses(404, 503))  # fmt: skip
async def version_metadata(name: str, version: str, state: StateDep) -> oip.ModelMetadata:
    return _metadata(state, _served(state, name, version))


@router.get("/models/{name}/ready", summary="OIP: the model is ready",
            responses=protocol_responses(404, 503))  # fmt: skip
async def model_ready(name: str, state: StateDep) -> dict[str, Any]:
    _served(state, name, None)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="OIP: the version is ready",
            responses=protocol_responses(404, 503))  # fmt: skip
async def version_ready(name: str, version: str, state: StateDep) -> dict[str, Any]:
    _served(state, name, version)
    return {"name": name, "ready": True}


# ----------------------------------------------------------------------------- infer

INFER_DOC = """OIP inference. One input: `image` (BYTES [N] or [N, 1], encoded image files;
base64 in JSON, raw with the binary extension), or `input` (UINT8 [N, 3, S, S] pixels after
the version's resize and crop; FP32 the same normalised with its mean and std). N is at most
ALEXNET_MAX_FILES. Output `probabilities` (FP32 [N, num_classes]); with `parameters:
{"classification": k}` the top k as BYTES "score:index:label". The binary tensor data
extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data` /
`binary_data_output`) and plain JSON. For image inputs the response parameter
`prediction_ids` lists each answer's id (comma-separated) for POST /v1/feedback."""

_INFER_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": oip.inline_schema(oip.InferRequest), "example": {
                "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 2, 2],
                            "data": [0] * 12}]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "description": "binary tensor data extension: the "
                                         "JSON header, then the tensors"},
        },
    }
}  # fmt: skip
_INFER_OK: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "model": oip.InferResponse,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the outputs; with binary outputs the JSON header, then their bytes",
    }
}
HeaderLength = Annotated[
    str | None,
    Header(alias=oip.HEADER_LENGTH, description="binary extension: the JSON header's length"),
]


def _outputs(request: oip.InferRequest, loaded: LoadedModel) -> list[tuple[int, bool]]:
    """(classification k or 0, binary) for each requested output."""
    params = request.parameters or {}
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise BadRequest("parameters.binary_data_output must be true or false")
    out = []
    n = loaded.card.num_classes
    outputs = request.outputs or [oip.RequestOutput(name=OUTPUT)]
    if len(outputs) > 1:
        raise BadRequest(f"{len(outputs)} outputs requested; this model has one, {OUTPUT!r}")
    for o in outputs:
        if o.name != OUTPUT:
            raise BadRequest(f"unknown output {o.name[:100]!r}; this model has {OUTPUT!r}")
        p = o.parameters or {}
        binary, k = p.get("binary_data", binary_all), p.get("classification", 0)
        if not isinstance(binary, bool):
            raise BadRequest(f"output {OUTPUT!r}: binary_data must be true or false")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
            raise BadRequest(f"output {OUTPUT!r}: classification must be 0..{n}")
        out.append((k, binary))
    return out


def _decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate request body (Triton's clients' `request_compression_algorithm`),
    inflated to at most `limit` bytes (a small bomb is refused, not inflated)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r}: gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequest(f"the body is not valid {encoding} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the {encoding} body inflates past {limit} bytes")
    if not inflater.eof:
        raise BadRequest(f"the {encoding} body is cut off")
    return out


def _batch_size(state: AppState, tensor: oip.Tensor) -> int:
    n = tensor.shape[0] if tensor.shape else 0
    if n < 1:
        raise BadRequest(f"input {tensor.name!r}: the batch dimension must be at least 1")
    most = min(state.settings.max_files, state.settings.max_queue)
    if n > most:
        raise TooManyFiles(f"input {tensor.name!r}: {n} images; at most {most} per request "
                           "(ALEXNET_MAX_FILES, and the queue's ALEXNET_MAX_QUEUE)")  # fmt: skip
    return n


def _pixels(state: AppState, loaded: LoadedModel, tensor: oip.Tensor) -> list[torch.Tensor]:
    """A preprocessed UINT8 or FP32 [N, 3, S, S] tensor as the batcher's items."""
    s = loaded.card.preprocessing.image_size
    if tensor.datatype not in ("UINT8", "FP32"):
        raise BadRequest(f"input {tensor.name!r}: datatype {tensor.datatype} is not accepted; "
                         "BYTES (image files), UINT8 or FP32 ([N, 3, S, S])")  # fmt: skip
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, s, s]:
        raise BadRequest(f"input {tensor.name!r}: shape {tensor.shape}; this version takes "
                         f"[N, 3, {s}, {s}]")  # fmt: skip
    _batch_size(state, tensor)
    assert tensor.array is not None
    x = torch.from_numpy(np.array(tensor.array))  # a copy: the body's buffer is read-only
    if tensor.datatype == "FP32":
        if not torch.isfinite(x).all():
            raise BadRequest(f"input {tensor.name!r}: FP32 data holds NaN or infinity")
        pre = loaded.card.preprocessing
        mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        std = torch.tensor(pre.std).view(1, 3, 1, 1)
        x = x * std + mean  # back to [0, 1] pixels: the model normalises them again
    return list(x.unbind(0))


async def _gather(rows: list[Awaitable[Row]], name: str) -> list[Row]:
    """Every answer, or the first failure (the protocol has no per-element errors)."""
    results = await asyncio.gather(*rows, return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, AppError):
            r.message = f"input {name!r} element {i}: {r.message}"
            raise r
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if not isinstance(r, BaseException)]


@router.post("/models/{name}/infer", summary="OIP: classify a tensor", response_model=oip.InferResponse,
             responses={**_INFER_OK, **protocol_responses(400, 404, 413, 415, 429, 503, 504)},
             openapi_extra=_INFER_BODY, description=INFER_DOC)  # fmt: skip
async def infer(name: str, request: Request, state: StateDep,
                header_length: HeaderLength = None) -> Response:  # fmt: skip
    return await _infer(state, request, name, None, header_length)


@router.post("/models/{name}/versions/{version}/infer", summary="OIP: classify with this version",
             response_model=oip.InferResponse,
             responses={**_INFER_OK, **protocol_responses(400, 404, 413, 415, 429, 503, 504)},
             openapi_extra=_INFER_BODY, description=INFER_DOC)  # fmt: skip
async def infer_version(name: str, version: str, request: Request, state: StateDep,
                        header_length: HeaderLength = None) -> Response:  # fmt: skip
    return await _infer(state, request, name, version, header_length)


async def _infer(state: AppState, request: Request, name: str, version: str | None,
                 header_length: str | None) -> Response:  # fmt: skip
    deadline = asyncio.get_running_loop().time() + state.settings.request_timeout_s
    try:
        loaded = _served(state, name, version)
    except AppError:
        async for _ in request.stream():  # read (within the limits), so the client reads
            pass  # the answer on a connection it can reuse, not a reset
        raise
    await admit(state, request)
    limit = infer_body_limit(state.settings.max_upload_bytes, state.settings.max_files)
    body = _decompressed(await request.body(), request.headers.get("content-encoding"), limit)
    try:  # off the event loop: a large JSON tensor takes a while to parse
        req, tensors = await asyncio.to_thread(oip.parse_request, body, header_length)
    except oip.TensorError as exc:
        raise BadRequest(str(exc)) from None
    if len(tensors) != 1:
        raise BadRequest(f"{len(tensors)} inputs; this model takes one: image or input")
    wanted = _outputs(req, loaded)
    tensor = tensors[0]
    try:  # the whole request, before any of it is decoded or queued
        state.batcher.admit(_batch_size(state, tensor))
    except BatcherError as exc:
        raise from_batcher_error(exc) from exc
    n_classes = loaded.card.num_classes
    k = state.answer_top_k(loaded, n_classes)
    pids: list[str] = []
    if tensor.datatype == "BYTES":
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise BadRequest(f"input {tensor.name!r}: BYTES shape {tensor.shape}; [N] or [N, 1]")
        _batch_size(state, tensor)
        assert tensor.items is not None
        limit = state.settings.max_upload_bytes
        for i, data in enumerate(tensor.items):
            if len(data) > limit:
                raise ImageTooLargeError(f"input {tensor.name!r} element {i}: {len(data)} "
                                         f"bytes; the limit is {limit}")  # fmt: skip
        rows = await _gather([classify_bytes(state, request, loaded, data, k, deadline)
                              for data in tensor.items], tensor.name)  # fmt: skip
        for data, row in zip(tensor.items, rows, strict=True):
            pid = new_prediction_id()
            state.keep(pid, data, loaded, row)
            pids.append(pid)
    else:
        items = _pixels(state, loaded, tensor)
        rows = await _gather([classify_tensor(state, request, loaded, x, k, deadline)
                              for x in items], tensor.name)  # fmt: skip
    threshold = confidence_threshold(state, None)
    uncertain = [judge(state, loaded, row, threshold) for row in rows]
    return _response(state, loaded, req, rows, wanted, pids, uncertain, threshold)


def _response(state: AppState, loaded: LoadedModel, req: oip.InferRequest, rows: list[Row],
              wanted: list[tuple[int, bool]], pids: list[str], uncertain: list[bool],
              threshold: float | None) -> Response:  # fmt: skip
    n, labels = len(rows), loaded.card.labels
    outputs = []
    for k, binary in wanted:
        if k:
            items = [f"{p:f}:{i}:{labels[i]}".encode() for row in rows for i, p in row[:k]]
            outputs.append(oip.Output(OUTPUT, "BYTES", [n, k], binary, items=items))
        else:
            probs = np.zeros((n, loaded.card.num_classes), dtype=np.float32)
            for r, row in enumerate(rows):
                idx, p = zip(*row, strict=True)
                probs[r, list(idx)] = p
            outputs.append(oip.Output(OUTPUT, "FP32", [n, loaded.card.num_classes], binary,
                                      array=probs))  # fmt: skip
    params: dict[str, Any] = {}
    if pids:
        params["prediction_ids"] = ",".join(pids)
    if threshold is not None:
        params["min_confidence"] = threshold
        params["uncertain"] = ",".join("true" if u else "false" for u in uncertain)
    head: dict[str, Any] = {"model_name": state.settings.model_name,
                            "model_version": loaded.version}  # fmt: skip
    if req.id is not None:
        head["id"] = req.id
    if params:
        head["parameters"] = params
    body, header_length = oip.encode_response(head, outputs)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream",
                    headers={oip.HEADER_LENGTH: str(header_length)})  # fmt: skip
