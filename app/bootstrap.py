"""First start with no model: ALEXNET_BOOTSTRAP = auto | imagenet | synthetic | none.

`auto`: torchvision's ImageNet weights when cached or downloadable, else a training job on
the built-in `synthetic` dataset, run by the admin job runner and activated when it is done
(visible under /admin/jobs as source `bootstrap`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from app.jobs.store import Job
from app.schemas import JobRequest
from app.state import AppState
from model.checkpoint import CheckpointError
from model.pretrained import cached_weights_path, import_torchvision

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 120.0

# The embedded default's recipe. 128 px rather than 64: the conv stack keeps a 3x3 map
# instead of 1x1 and learns the shapes in fewer steps. Cosine decay over the 4 epochs: the
# rate is low by the end of a run this short, which plateau never gets to (measured on a
# 2-core CPU: 97.2% val top-1 in ~4.4 min; plateau 91.4%; 64 px 68%). No dropout: it only
# slows learning on this little data. Batch 32: many steps per minute on a CPU.
BOOTSTRAP_RECIPE: Final = JobRequest(
    dataset="synthetic", image_size=128, batch_size=32, dropout=0.0, epochs=4,
    scheduler="cosine", activate="always",
)  # fmt: skip


async def import_imagenet(state: AppState, *, allow_download: bool) -> bool:
    """torchvision's ImageNet AlexNet from the torch hub cache (or a download)."""
    cached = cached_weights_path()
    if not allow_download and not cached.is_file():
        return False
    if cached.is_file():
        log.info("bootstrap: importing torchvision's ImageNet AlexNet from %s", cached)
    else:
        log.info("bootstrap: no ImageNet weights in %s; trying to download them", cached)
    models_dir = state.settings.models_dir
    try:
        card = await asyncio.wait_for(asyncio.to_thread(import_torchvision, models_dir),
                                      DOWNLOAD_TIMEOUT_S)  # fmt: skip
    except TimeoutError:
        log.warning("bootstrap: the ImageNet weights did not arrive within %.0f s",
                    DOWNLOAD_TIMEOUT_S)  # fmt: skip
        return False
    except CheckpointError as exc:
        log.warning("bootstrap: ImageNet weights unavailable: %s", exc)
        return False
    log.info("bootstrap: imported torchvision's ImageNet AlexNet as version %s", card.version)
    await state.activate(card.version)  # (under the model lock, like every change of model)
    return True


def start_synthetic_job(state: AppState) -> Job:
    """Queue the bootstrap training job, or pick up one a previous start left unfinished."""
    for job in state.jobs.list(limit=1000):
        if job.source != "bootstrap" or job.status not in ("queued", "running", "interrupted"):
            continue
        if job.status == "interrupted":
            log.info("resuming the bootstrap job %s", job.id)
            state.runner.requeue(job.id)
        return job
    s = state.settings
    recipe = JobRequest.model_validate({
        **BOOTSTRAP_RECIPE.model_dump(), "dataset": s.bootstrap_dataset,
        "epochs": s.bootstrap_epochs or BOOTSTRAP_RECIPE.epochs})  # fmt: skip
    job = state.jobs.create(recipe, source="bootstrap")
    state.runner.wake()
    log.info("bootstrap: training the built-in model offline as job %s (%s, %d epochs at %d "
             "px); it is served when it finishes, and GET /admin/jobs/%s shows its progress",
             job.id, recipe.dataset, recipe.epochs, recipe.image_size, job.id)  # fmt: skip
    return job


async def bootstrap(state: AppState) -> None:
    mode = state.settings.bootstrap
    models_dir = state.settings.models_dir
    if mode == "none":
        state.status, state.status_detail = "no_model", "ALEXNET_BOOTSTRAP=none"
        log.warning("no model version to serve in %s and ALEXNET_BOOTSTRAP=none: not ready "
                    "until one is trained, imported or activated", models_dir)  # fmt: skip
        return
    log.info("no model version to serve in %s: ALEXNET_BOOTSTRAP=%s", models_dir, mode)
    state.status = "bootstrapping"
    if mode in ("auto", "imagenet"):
        state.status_detail = "importing torchvision's ImageNet weights"
        if await import_imagenet(state, allow_download=True):
            return
        if mode == "imagenet":
            state.status, state.status_detail = "no_model", "ImageNet weights unavailable"
            log.warning("bootstrap: ALEXNET_BOOTSTRAP=imagenet and no ImageNet weights: "
                        "not ready")  # fmt: skip
            return
    job = start_synthetic_job(state)
    state.bootstrap_job_id = job.id
    state.status_detail = f"training the built-in model on synthetic data (job {job.id})"
