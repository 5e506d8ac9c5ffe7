"""The service's state, built by the lifespan and read by routes through dependencies."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import Depends, Request

from app.batching import BatchStats, MicroBatcher, Row
from app.errors import ModelNotReady
from app.intake import Decoder
from app.metrics import Metrics
from app.registry import LoadedModel, Registry, prepare
from app.settings import Settings
from model.checkpoint import CheckpointError
from model.device import Placement, resolve
from model.images import DecodeLimits

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    placement: Placement
    batcher: MicroBatcher[LoadedModel]
    decoder: Decoder
    started_at: float = field(default_factory=time.time)
    status: str = "starting"  # starting | loading | bootstrapping | ready | no_model
    status_detail: str = ""
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def model(self) -> LoadedModel:
        current = self.registry.current
        if current is None:
            raise ModelNotReady(
                f"no model is loaded yet ({self.status}{': ' + self.status_detail if self.status_detail else ''})",
                retry_after_s=5,
            )
        return current

    def warmup_sizes(self) -> tuple[int, ...]:
        return tuple(
            sorted({1, min(8, self.settings.max_batch_size), self.settings.max_batch_size})
        )

    def load(self, version: str) -> LoadedModel:
        """Blocking: load, check and warm a version (run it in a thread)."""
        s = self.settings
        return prepare(self.registry.version_dir(version), self.placement,
                       channels_last=s.channels_last, compile_model=s.compile,
                       warmup_batch_sizes=self.warmup_sizes())  # fmt: skip

    def serve(self, loaded: LoadedModel, *, persist: bool = True) -> None:
        self.registry.swap(loaded, persist=persist)
        d = loaded.placement.describe()
        self.metrics.set_model(loaded.version, d["device"], d["precision"], loaded.compiled)
        self.status, self.status_detail = "ready", loaded.version

    async def load_initial(self) -> bool:
        """Serve ACTIVE, or the newest other good version if ACTIVE is broken."""
        self.status = "loading"
        for version in self.registry.candidates():
            try:
                loaded = await asyncio.to_thread(self.load, version)
            except CheckpointError as exc:
                log.error("cannot serve version %s: %s", version, exc)
                continue
            # Never rewrite ACTIVE at startup: if it is broken, we serve the newest good
            # version and GET /v1/models shows "active" and "serving" apart.
            self.serve(loaded, persist=False)
            return True
        self.status = "no_model"
        return False


def build_state(settings: Settings) -> AppState:
    metrics = Metrics()
    registry = Registry(settings.models_dir)
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
        on_batch=on_batch,
    )
    # Half the cores decode; the model's own threads use the rest (measured on 2 cores:
    # one decode thread serves ~10% more images/s than two).
    threads = settings.decode_threads or max(1, (os.cpu_count() or 2) // 2)
    decoder = Decoder(
        DecodeLimits(max_pixels=settings.max_image_pixels, max_side=settings.max_image_side),
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode"),
    )
    return AppState(settings, registry, metrics, placement, batcher, decoder)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.alexnet
    return state


StateDep = Annotated[AppState, Depends(get_state)]
