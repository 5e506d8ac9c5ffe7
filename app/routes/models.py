"""GET /v1/models, /v1/models/active and a version's reliability diagram."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from app import paths
from app.deps import StateDep
from app.errors import NotFound, responses
from app.schemas import ModelsResponse, VersionSummary
from app.storage import tree_bytes
from model.checkpoint import RELIABILITY_FILE, CheckpointError

router = APIRouter(prefix=paths.MODELS, tags=["models"])


@router.get("", summary="Every version with its metrics", response_model=ModelsResponse)
async def list_models(state: StateDep) -> ModelsResponse:
    registry, model_dir = state.registry, state.settings.model_dir
    active = registry.active_version()
    serving = registry.current.version if registry.current else None
    versions = [
        VersionSummary(
            **c.summary(),
            size_bytes=tree_bytes(registry.folder_of(c.version)),
            active=c.version == active,
            serving=c.version == serving,
        )
        for c in registry.cards()
    ]
    return ModelsResponse(active=active, serving=serving, versions=versions,
                          model_dir=str(model_dir) if model_dir else None)  # fmt: skip


@router.get(
    "/active",
    summary="The served version's model.json, with device, precision and compilation",
    responses={**responses(503), 200: {"content": {"application/json": {"example": {
        "version": "20261127-031500-ab12", "arch": "alexnet", "num_classes": 1000,
        "labels": ["tench", "goldfish", "..."], "image_size": 224, "resize_size": 256,
        "resize": "center_crop", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "metrics": {"val_top1": 0.565}, "device": "cpu", "precision": "bf16", "compiled": False,
        "calibrated": True, "calibration": {"temperature": 1.42, "ece_before": 0.081,
        "ece_after": 0.019, "nll_before": 1.31, "nll_after": 1.22, "bins": 15, "n": 1500},
        "precision_check": {"agreement_with_fp32": 1.0, "probes": 128, "requested": "bf16",
                            "parity": {"fp32": {"probes": 8, "passed": True,
                                                "max_difference": 0.0004}}}}}}}},
)  # fmt: skip
async def active_model(state: StateDep) -> dict[str, Any]:
    info = state.model.info()
    if state.settings.model_dir is not None:
        info["model_dir"] = str(state.settings.model_dir)
    return info


@router.get(
    "/{version}/reliability.png",
    summary="A calibrated version's reliability diagram, before and after its temperature",
    description="Accuracy per bin of top-1 probability (15 equal-width bins) on the "
    "dataset's frozen holdout, with the uncalibrated softmax (T = 1) on the left and the "
    "fitted temperature on the right; the title gives each side's expected calibration "
    "error. 404 for a version without calibration.",
    response_class=FileResponse,
    responses={**responses(404), 200: {"content": {"image/png": {}}}},
)  # fmt: skip
async def reliability(
    version: Annotated[str, Path(examples=["20261127-031500-ab12"])], state: StateDep
) -> FileResponse:
    try:
        folder = state.registry.stored_version_dir(version)
    except CheckpointError as exc:
        raise NotFound(f"no model version {version!r}") from exc
    path = folder / RELIABILITY_FILE
    if path.is_symlink() or not path.is_file():  # only what the version's writer put there
        raise NotFound(f"version {version} is not calibrated, so it has no reliability diagram "
                       f"(calibrate it: alexnet calibrate {version} --dataset SPEC)")  # fmt: skip
    return FileResponse(path, media_type="image/png",
                        headers={"Cache-Control": "public, max-age=86400, immutable"})  # fmt: skip
