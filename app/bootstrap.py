"""First start with no model: ALEXNET_BOOTSTRAP = auto | imagenet | synthetic | none."""

from __future__ import annotations

import asyncio
import logging

from app.state import AppState
from model.checkpoint import CheckpointError
from model.pretrained import cached_weights_path, import_torchvision

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 120.0


async def import_imagenet(state: AppState, *, allow_download: bool) -> bool:
    """torchvision's ImageNet AlexNet from the torch hub cache (or a download)."""
    if not allow_download and not cached_weights_path().is_file():
        return False
    models_dir = state.settings.models_dir
    try:
        card = await asyncio.wait_for(asyncio.to_thread(import_torchvision, models_dir),
                                      DOWNLOAD_TIMEOUT_S)  # fmt: skip
    except (CheckpointError, TimeoutError) as exc:
        log.warning("ImageNet weights unavailable: %s", exc)
        return False
    loaded = await asyncio.to_thread(state.load, card.version)
    state.serve(loaded)
    return True


async def bootstrap(state: AppState) -> None:
    mode = state.settings.bootstrap
    if mode == "none":
        state.status, state.status_detail = "no_model", "ALEXNET_BOOTSTRAP=none"
        return
    state.status = "bootstrapping"
    if mode in ("auto", "imagenet"):
        state.status_detail = "importing torchvision's ImageNet weights"
        if await import_imagenet(state, allow_download=True):
            return
        if mode == "imagenet":
            state.status, state.status_detail = "no_model", "ImageNet weights unavailable"
            return
    # The offline fallback, a training job on `synthetic`, needs the admin API's job runner
    # (not built yet): until then the service says how to get a model.
    state.status, state.status_detail = (
        "no_model",
        "no model yet: run `alexnet train --dataset synthetic --image-size 64` or "
        "`alexnet import-torchvision`",
    )
