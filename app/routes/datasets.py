"""/admin/datasets: import an archive of class folders, list, show, delete; and
/admin/models/{version}/evaluate on a dataset's split. Every route needs the bearer token."""

from __future__ import annotations

import asyncio
import errno
import shutil
from typing import IO, Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.multipart import parse_options_header

from app import paths
from app.datasets import check_not_in_use
from app.deps import AdminDep, StateDep
from app.errors import (
    AppError,
    BadRequest,
    Conflict,
    InsufficientStorage,
    InvalidArchive,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    TooManyFiles,
    UnsupportedMediaType,
    ValidationFailed,
    responses,
)
from app.intake import read_form
from model.checkpoint import CheckpointError, load_version
from model.config import DATASET_RE
from model.data import DatasetError
from model.datasets import NAME_RE, DatasetImportError, check_name, exists_error
from model.evaluation import evaluate_version

router = APIRouter(
    prefix=paths.ADMIN_PREFIX, tags=["admin"], dependencies=[AdminDep],
    responses=responses(401, 503),
)  # fmt: skip

Name = Annotated[str, Path(pattern=f"^{NAME_RE.pattern}$", examples=["flowers"],
                           description="letters, digits, '.', '_', '-' (1-64)")]  # fmt: skip

# (Any Content-Type is taken for the raw body: the bytes say what it is.)
_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}  # fmt: skip

_EXAMPLE: dict[str, Any] = {
    "name": "flowers", "spec": "imagefolder:flowers", "classes": ["daisy", "rose", "tulip"],
    "num_classes": 3, "images": 240, "splits": {"trainval": 204, "holdout": 36},
    "per_class": {"daisy": {"trainval": 68, "holdout": 12}}, "bytes": 18_400_000,
    "hash": "3b1f...", "layout": "class_folders",
    "holdout": {"share": 0.15, "seed": 0, "from": "drawn", "images": 36},
    "created_at": "2026-12-01T17:00:00Z", "source": "upload flowers.zip",
    "skipped_count": 1, "skipped": [{"path": "rose/notes.txt", "reason": "not an image"}],
}  # fmt: skip


_BY_KIND: dict[str, type[AppError]] = {
    "unsupported": UnsupportedMediaType, "malformed": InvalidArchive,
    "too_large": PayloadTooLarge, "too_many_files": TooManyFiles,
    "unusable": ValidationFailed, "bad_name": ValidationFailed, "exists": Conflict,
    "busy": Conflict,
    "no_space": InsufficientStorage, "not_found": NotFound,
}  # fmt: skip


def to_app_error(exc: DatasetImportError) -> AppError:
    """An import error in the envelope: 415, 400, 413, 422, 409, 507 or 404 by its kind."""
    return _BY_KIND.get(exc.kind, BadRequest)(str(exc), details=exc.details)


class DatasetOut(BaseModel):
    """A dataset's manifest, less its image list."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [_EXAMPLE]})

    name: str
    spec: str = Field(description="what POST /admin/jobs takes as `dataset`")
    classes: list[str]
    images: int
    splits: dict[str, int] = Field(description="trainval (each job splits it by its "
                                   "val_split and seed), or train and val as uploaded; holdout")  # fmt: skip
    per_class: dict[str, dict[str, int]]
    bytes: int
    hash: str = Field(description="sha256 over the relative paths and file hashes")
    holdout: dict[str, Any]
    created_at: str
    source: str


class DatasetList(BaseModel):
    datasets: list[dict[str, Any]]


class DeletedDataset(BaseModel):
    deleted: str
    freed_bytes: int


@router.post(
    "/datasets/{name}", status_code=201, response_model=DatasetOut,
    summary="Import a zip, tar or tar.gz of class folders as a dataset",
    description="The archive as the raw body (`curl --data-binary @flowers.zip -H "
    "'Content-Type: application/zip'`) or as the multipart field `file`. Layouts: "
    "`<class>/<image>`, the same under one top folder, or `train/<class>/...` with `val/` "
    "and/or `test/` (kept as split; `test/` is the holdout). Every image is decoded as an "
    "upload is; unreadable and non-image files are listed in `skipped`. The dataset appears "
    "whole or not at all.",
    openapi_extra=_BODY,
    responses=responses(400, 404, 409, 413, 415, 422, 507, examples={
        400: ("invalid_archive", "member name '../x.jpg' leaves the dataset ('..')"),
        409: ("conflict", "dataset 'flowers' exists; import with replace=true"),
        415: ("unsupported_media_type", "the body is not a zip, tar or tar.gz archive"),
        422: ("validation_error", "1 class folder(s) (roses); at least 2 are needed"),
        507: ("insufficient_storage", "the disk filled up while importing 'flowers'")}),
)  # fmt: skip
async def import_dataset(
    name: Name, request: Request, state: StateDep,
    replace: Annotated[bool, Query(description="replace a dataset of this name")] = False,
) -> dict[str, Any]:  # fmt: skip
    store = state.datasets
    try:
        check_name(name)  # before a byte of the body is read
        if (store.data_dir / name).exists():
            if not replace:
                raise exists_error(name)
            check_not_in_use(state.jobs, name, "replace")
        main, _ = parse_options_header(request.headers.get("content-type", ""))
        ctype = main.decode("latin-1").strip().lower()

        def not_in_use() -> None:  # again, under the name's lock, just before the swap
            check_not_in_use(state.jobs, name, "replace")

        with store.upload_file() as f:
            source = await _receive(request, ctype, f, state.settings.max_dataset_bytes)
            manifest = await asyncio.to_thread(store.import_archive, f, name, source=source,
                                               replace=replace, guard=not_in_use)  # fmt: skip
    except DatasetImportError as exc:
        raise to_app_error(exc) from exc
    return manifest.as_json()


async def _receive(request: Request, ctype: str, f: IO[bytes], limit: int) -> str:
    """The archive into `f` (raw body or the multipart field `file`); where it came from."""
    try:
        if ctype == "multipart/form-data":
            form = await read_form(request, max_files=1, max_file_bytes=limit)
            try:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise BadRequest("send the archive as the multipart field `file`")
                await asyncio.to_thread(shutil.copyfileobj, upload.file, f)
                filename = upload.filename or "archive"
            finally:
                await form.close()
        else:
            # The bytes decide, not the Content-Type (curl --data-binary sends
            # application/x-www-form-urlencoded unless told otherwise): not an archive is 415.
            # Written 1 MiB at a time off the event loop.
            pending = bytearray()
            async for chunk in request.stream():
                pending += chunk
                if len(pending) >= 1 << 20:
                    await asyncio.to_thread(f.write, bytes(pending))
                    pending.clear()
            if pending:
                await asyncio.to_thread(f.write, bytes(pending))
            filename = ctype or "archive"
        f.flush()
        f.seek(0)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the disk under the data dir is full: the archive "
                                      "could not be received; free space and retry") from exc  # fmt: skip
        raise
    return f"upload {filename}"


@router.get("/datasets", response_model=DatasetList, summary="Datasets, with classes, "
            "counts, hash and holdout")  # fmt: skip
async def list_datasets(state: StateDep) -> DatasetList:
    def listing() -> list[dict[str, Any]]:
        out = []
        for n in state.datasets.names():
            try:
                out.append(state.datasets.get(n, build=False).summary())
            except FileNotFoundError:
                out.append({"name": n, "spec": f"imagefolder:{n}", "manifest": False,
                            "note": "a folder made by hand: its manifest (and holdout) is "
                            "made at its first use, or by GET /admin/datasets/" + n})  # fmt: skip
            except DatasetError as exc:
                out.append({"name": n, "spec": f"imagefolder:{n}", "error": str(exc)})
        return out

    return DatasetList(datasets=await asyncio.to_thread(listing))


@router.get("/datasets/{name}", response_model=DatasetOut, summary="One dataset, with the "
            "skipped-file report", responses=responses(404, 422))  # fmt: skip
async def get_dataset(name: Name, state: StateDep) -> dict[str, Any]:
    try:
        manifest = await asyncio.to_thread(state.datasets.get, name)
    except DatasetImportError as exc:
        raise to_app_error(exc) from exc
    except DatasetError as exc:
        raise ValidationFailed(str(exc)) from exc
    return manifest.as_json()


@router.delete("/datasets/{name}", response_model=DeletedDataset, summary="Delete a dataset "
               "no queued or running job uses", responses=responses(404, 409))  # fmt: skip
async def delete_dataset(name: Name, state: StateDep) -> DeletedDataset:
    try:
        freed = await asyncio.to_thread(
            state.datasets.delete, name, guard=lambda: check_not_in_use(state.jobs, name, "delete"))  # fmt: skip
    except DatasetImportError as exc:
        raise to_app_error(exc) from exc
    return DeletedDataset(deleted=name, freed_bytes=freed)


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dataset": "imagefolder:flowers", "split": "holdout"}]})  # fmt: skip

    dataset: str | None = Field(None, description="a dataset SPEC; default: the one the "
                                "version was trained on")  # fmt: skip
    split: Literal["holdout", "val", "all"] = Field(
        "holdout", description="holdout (never trained on), val, or all"
    )


_evaluating = asyncio.Lock()


@router.post(
    "/models/{version}/evaluate",
    summary="Evaluate a version on a dataset's split (holdout by default)",
    description="The one prediction path at the served device and precision: loss, top-1, "
    "top-5, per class, the confusion matrix. One evaluation at a time (429 meanwhile).",
    responses=responses(400, 404, 413, 422, 429, examples={
        400: ("invalid_request", "There was an error parsing the body")}),
)  # fmt: skip
async def evaluate_model(
    version: Annotated[str, Path(examples=["20261127-031500-ab12"])],
    state: StateDep, req: EvaluateRequest | None = None,
) -> dict[str, Any]:  # fmt: skip
    req = req or EvaluateRequest()
    try:
        vdir = state.registry.stored_version_dir(version)
    except CheckpointError as exc:
        raise NotFound(f"no model version {version!r}") from exc
    if _evaluating.locked():
        raise Overloaded("an evaluation is running; retry when it has finished", retry_after_s=10)
    s = state.settings
    placement = state.registry.current.placement if state.registry.current else state.placement

    def run() -> dict[str, Any]:
        net, card = load_version(vdir)
        spec = req.dataset or card.dataset
        if spec is None or not DATASET_RE.fullmatch(spec):
            raise DatasetError(f"dataset: give a dataset SPEC ({card.version} records none)"
                               if spec is None else f"unknown dataset {spec!r}")  # fmt: skip
        report = evaluate_version(net, card, spec, split=req.split, data_dir=s.data_dir,
                                  placement=placement, channels_last=s.channels_last,
                                  holdout_share=s.holdout_split)  # fmt: skip
        return {**report.as_json(), **placement.describe()}

    async with _evaluating:
        try:
            return await asyncio.to_thread(run)
        except (DatasetError, CheckpointError) as exc:
            raise ValidationFailed(str(exc)) from exc
