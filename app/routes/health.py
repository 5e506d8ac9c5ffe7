"""GET /healthz (the process is up), /readyz (a model is loaded and warm), /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import StateDep
from app.errors import responses
from app.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", summary="A model is loaded and warmed up", response_model=Readiness,
            responses=responses(503))  # fmt: skip
async def readyz(state: StateDep) -> Readiness:
    loaded = state.model  # 503 model_not_ready with Retry-After until then
    d = loaded.placement.describe()
    return Readiness(status="ready", version=loaded.version, device=d["device"],
                     precision=d["precision"])  # fmt: skip


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"example": "alexnet_queue_depth 0.0\n"}}}})  # fmt: skip
async def metrics(state: StateDep) -> Response:
    state.metrics.queue_depth.set(state.batcher.depth)
    state.metrics.ready.set(1 if state.registry.current is not None else 0)
    # off the event loop: the job gauges read the job store (app/jobs/metrics.py)
    text = await asyncio.to_thread(generate_latest, state.metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
