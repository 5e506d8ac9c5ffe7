"""GET /v1/models and /v1/models/active."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app import paths
from app.deps import StateDep
from app.errors import responses
from app.schemas import ModelsResponse, VersionSummary
from app.storage import tree_bytes

router = APIRouter(prefix=paths.MODELS, tags=["models"])


@router.get("", summary="Every version with its metrics", response_model=ModelsResponse)
async def list_models(state: StateDep) -> ModelsResponse:
    active = state.registry.active_version()
    serving = state.registry.current.version if state.registry.current else None
    models_dir = state.registry.models_dir
    versions = [
        VersionSummary(
            **c.summary(),
            size_bytes=tree_bytes(models_dir / c.version),
            active=c.version == active,
            serving=c.version == serving,
        )
        for c in state.registry.cards()
    ]
    return ModelsResponse(active=active, serving=serving, versions=versions)


@router.get(
    "/active",
    summary="The served version's model.json, with device, precision and compilation",
    responses={**responses(503), 200: {"content": {"application/json": {"example": {
        "version": "20261127-031500-ab12", "arch": "alexnet", "num_classes": 1000,
        "labels": ["tench", "goldfish", "..."], "image_size": 224, "resize_size": 256,
        "resize": "center_crop", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "metrics": {"val_top1": 0.565}, "device": "cpu", "precision": "bf16", "compiled": False,
        "precision_check": {"agreement_with_fp32": 1.0, "probes": 128, "requested": "bf16"}}}}}},
)  # fmt: skip
async def active_model(state: StateDep) -> dict[str, Any]:
    return state.model.info()
