"""The FastAPI app: `uvicorn app.main:create_app --factory` (what `alexnet serve` runs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import warnings
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from PIL import Image

from app.bootstrap import bootstrap
from app.deps import reject_unknown_query
from app.docs import install_docs
from app.errors import install_handlers
from app.feedback import snapshot_names
from app.intake import body_limits
from app.middleware import (
    AdminAuthMiddleware,
    AllowedHostsMiddleware,
    BodyLimitMiddleware,
    HeadMiddleware,
    MetricsMiddleware,
    NoWebSocketMiddleware,
    SecurityHeadersMiddleware,
    page_csp,
)
from app.presence import HEARTBEAT_S, announce, live_servers, withdraw
from app.presence import update as update_presence
from app.routes import admin, classify, datasets, feedback, health, models, oip
from app.settings import Settings
from app.state import AppState, build_state
from model.data import FEEDBACK_SNAPSHOTS

log = logging.getLogger(__name__)

DESCRIPTION = """Train and serve AlexNet image classifiers.

Upload images to **POST /v1/classify** (one `file`) or **/v1/classify/batch** (several
`files`) and get softmax top-k answers. Every error has the same shape:
`{"error": {"code", "message", "details"}}`.
"""


async def _startup(state: AppState) -> None:
    try:
        if not await state.load_initial() and state.settings.model_dir is None:
            await bootstrap(state)  # (ALEXNET_MODEL_DIR: that folder or nothing)
    except Exception:
        log.exception("startup failed; the service stays up but not ready")
        state.status, state.status_detail = "no_model", "startup failed; see the log"


async def _watch_active(state: AppState) -> None:
    """Serve whatever ACTIVE names, when another process (a replica running jobs, or
    `alexnet models activate`) changes it."""
    failed: str | None = None
    while True:
        await asyncio.sleep(state.settings.watch_active_s)
        try:
            active = state.registry.active_version()
            serving = state.registry.current.version if state.registry.current else None
            busy = state.model_lock.locked() or state.status in ("starting", "loading")
            if active is None or active in (serving, failed) or busy:
                continue  # (an activation in progress writes ACTIVE before it serves)
            log.info("ACTIVE changed to %s: activating it", active)
            # Serve it without writing ACTIVE back: a newer `models activate` made while
            # this one loaded must win, and is picked up on the next tick.
            await state.activate(active, persist=False)
            failed = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("cannot serve ACTIVE version %s: %s", active, exc)
            failed = active


async def _heartbeat(state: AppState) -> None:
    """Renew this server's record under $ALEXNET_HOME/servers/ (app/presence.py)."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        if state.presence is not None:
            await asyncio.to_thread(update_presence, state.presence)


def start_feedback(state: AppState) -> None:
    """At start, before this server writes feedback: reconcile the store after a crash
    (blobs younger than a minute are left alone while another server shares the home: it
    may be between a blob and its record), apply retention, and remove the feedback
    snapshots no job can read any more."""
    # (this server has not announced itself yet: every live record is another's; a pid
    # says nothing in containers, where every server may be pid 1)
    others = live_servers(state.settings.home)
    state.feedback.reconcile(grace_s=60.0 if others else 0.0)
    state.feedback.expire()
    keep = {n for status in ("queued", "running", "interrupted", "cancelled")
            for j in state.jobs.list(status=status, limit=10_000) if j.purged_at is None
            for n in snapshot_names(j.config)}  # fmt: skip
    root = state.settings.data_dir / FEEDBACK_SNAPSHOTS
    if root.is_dir():
        for d in root.iterdir():
            busy = d.name.startswith(("judge-", ".tmp-"))  # another server's, maybe
            if d.name not in keep and not (others and busy):
                shutil.rmtree(d, ignore_errors=True)


async def start_home(state: AppState) -> None:
    """What a server of an ALEXNET_HOME does besides serving (none of it with
    ALEXNET_MODEL_DIR): tidy what killed writers left, keep answers, run jobs, tell the
    other servers of the home about itself and follow ACTIVE."""
    s = state.settings
    # Imports a killed server left half-done (never a live one's: they hold a lock).
    await asyncio.to_thread(state.datasets.clean_stale)
    # What a killed writer left (blobs without records, records without blobs, a job's
    # snapshot), and retention, whether or not this server keeps answers now.
    await asyncio.to_thread(start_feedback, state)
    if state.keeper is not None:
        state.keeper.start()
    if s.run_jobs:
        state.runner.start()
    state.presence = announce(s.home, watch_active_s=s.watch_active_s)
    state.tasks.append(asyncio.create_task(_heartbeat(state), name="heartbeat"))
    if s.watch_active_s > 0:
        state.tasks.append(asyncio.create_task(_watch_active(state), name="watch-active"))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
        # (`alexnet serve` has configured logging already, for its own warnings: our
        # loggers still speak at ALEXNET_LOG_LEVEL)
        for name in ("app", "model"):
            logging.getLogger(name).setLevel(settings.log_level.upper())
        # Pillow's decompression-bomb warnings are errors, not log lines.
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        state = build_state(settings)
        app.state.alexnet = state
        if settings.model_dir is None:  # ALEXNET_MODEL_DIR: nothing under ALEXNET_HOME
            await start_home(state)
        state.batcher.start()
        state.tasks.append(asyncio.create_task(_startup(state), name="startup"))
        state.tasks.append(asyncio.create_task(state.trimmer.run(), name="memory-trim"))
        try:
            yield
        finally:
            if state.presence is not None:
                withdraw(state.presence)
            for task in state.tasks:
                task.cancel()
            await state.runner.stop()
            state.jobs.close()
            await state.batcher.stop(drain_timeout_s=min(5.0, settings.shutdown_timeout_s))
            state.decoder.executor.shutdown(wait=False, cancel_futures=True)
            if state.keeper is not None:  # (after the batcher: the last answers are kept)
                await asyncio.to_thread(state.keeper.stop)
            state.feedback_executor.shutdown(wait=True, cancel_futures=True)
            state.feedback.close()

    app = FastAPI(
        title="alexnet-service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # No redirect from /path/ to /path: Starlette builds it from the request's Host
        # header, which a client controls; a trailing slash is a 404 like any unknown path.
        redirect_slashes=False,
        docs_url=None,  # app/docs.py serves /docs and /redoc without a CDN
        redoc_url=None,
        dependencies=[Depends(reject_unknown_query)],
        openapi_tags=[
            {"name": "classify", "description": "Upload images, get top-k classes"},
            {"name": "models", "description": "Model versions and the served one"},
            {"name": "health", "description": "Liveness, readiness, metrics"},
            {
                "name": "admin",
                "description": "Training jobs, datasets, evaluation and activation (bearer token)",
            },
        ],
    )
    install_handlers(app)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(datasets.router)
    app.include_router(feedback.router)
    app.include_router(feedback.admin)
    app.include_router(oip.router)
    install_docs(app)

    page = resources.files("app").joinpath("static/index.html").read_text()
    csp = page_csp(page)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    limit_for = body_limits(settings.max_upload_bytes, settings.max_files,
                            settings.max_dataset_bytes)  # fmt: skip
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for,
                       body_timeout_s=settings.body_timeout_s,
                       dataset_body_timeout_s=settings.dataset_upload_timeout_s,
                       max_in_flight_bytes=settings.max_upload_bytes_in_flight)  # fmt: skip
    # Outside the body limit and everything that reads a body: an unauthenticated /admin
    # request is 401 whatever it sends (and its connection is closed unread).
    app.add_middleware(AdminAuthMiddleware, token=lambda: settings.admin_token)
    if settings.cors_origins:
        # Off by default. Browsers may send the admin token only to listed origins: with
        # "*" no credentials are allowed at all.
        wildcard = "*" in settings.cors_origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"] if wildcard else settings.cors_origins,
            allow_credentials=not wildcard,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(HeadMiddleware)
    app.add_middleware(NoWebSocketMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware)
    if settings.allowed_hosts:
        app.add_middleware(AllowedHostsMiddleware, hosts=settings.allowed_hosts)
    return app
