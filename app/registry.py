"""Model versions as the service sees them: load, validate, warm up, hot swap.

`LoadedModel` is immutable; swapping replaces the registry's reference between batches.
Requests keep the LoadedModel they were preprocessed for, so none mixes versions.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.memory import trim
from model import probes
from model.checkpoint import (
    CARD_FILE,
    CheckpointError,
    ModelCard,
    list_cards,
    load_version,
    read_active,
    read_card,
    resolve_version_dir,
    stored_version_dir,
    write_active,
)
from model.device import Placement
from model.files import remove_partial_saves
from model.images import DecodeLimits, ImageError
from model.predictor import Predictor, Row
from model.synthetic import render

log = logging.getLogger(__name__)

AGREEMENT_MIN = 0.99  # reduced precision is kept only at >= 99% top-1 agreement with fp32
PROBE_IMAGES = 128


@dataclass(frozen=True)
class LoadedModel:
    card: ModelCard
    predictor: Predictor
    placement: Placement
    compiled: bool = False
    precision_check: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.card.version

    def info(self) -> dict[str, Any]:
        out = {
            **self.card.model_dump(mode="json"),
            **self.placement.describe(),
            "compiled": self.compiled,
            "precision_check": self.precision_check,
            "calibrated": self.card.calibration is not None,
        }
        if self.card.calibration is None:
            out["calibration_note"] = (
                "not calibrated: probabilities are the plain softmax, which for AlexNet is "
                "usually over-confident; fit a temperature with alexnet calibrate "
                f"{self.card.version} --dataset SPEC (a new version)"
            )
        return out

    def run_batch(self, batch: torch.Tensor, top_k: int) -> list[Row]:
        """Runs on the batcher's executor thread."""
        return self.predictor.rows(batch, top_k)


def _probe_batch(predictor: Predictor, n: int) -> torch.Tensor:
    """`n` deterministic, varied images (the built-in shapes) at the model's input size."""
    size = predictor.card.resize_size
    imgs = [torch.from_numpy(render(7, i, size)[0]).permute(2, 0, 1) for i in range(n)]
    return predictor.inputs(torch.stack(imgs))


class ParityRefused(CheckpointError):
    """fp32 serving does not reproduce the version's probes: it is not served."""


def parity(predictor: Predictor, version_dir: Path, card: ModelCard) -> dict[str, Any]:
    """The probes through `predictor`'s whole serving path (model/probes.py)."""
    precision = predictor.placement.precision
    tolerance_key = probes.tolerance_key(predictor.placement)
    if not card.probes:
        return {"precision": precision, "probes": 0, "passed": None,
                "reason": "this version carries no probes (written before versions did)"}  # fmt: skip
    limits = DecodeLimits()
    try:
        report = probes.check(card.probes, version_dir, tolerance_key,
                              lambda data: predictor.scores(data, limits))  # fmt: skip
    except (probes.ParityError, ImageError) as exc:
        raise CheckpointError(f"{version_dir / CARD_FILE}: {exc}") from exc
    return report.as_dict()


def _failures(report: dict[str, Any]) -> str:
    shown, n = report["failures"][:2], report["failed"]
    return "; ".join(shown) + (f" (and {n - len(shown)} more of {report['probes']})"
                               if n > len(shown) else "")  # fmt: skip


def prepare(
    version_dir: Path,
    placement: Placement,
    *,
    channels_last: bool = True,
    compile_model: bool = False,
    warmup_batch_sizes: tuple[int, ...] = (1, 8),
) -> LoadedModel:
    """Load and validate a version, place it, and check it before serving:

    1. the parity probes at fp32 (model/probes.py): a failure refuses the version
       (`ParityRefused`, naming the probe and the difference);
    2. at a reduced precision, the probes within that precision's tolerance and top-1
       agreement with fp32 on `PROBE_IMAGES` built-in images (>= 99%); either failing
       serves fp32 and says why (`precision_check.fallback`).

    Then compile if asked and warm up. Blocking: call it from a worker thread."""
    t0 = time.perf_counter()
    net, card = load_version(version_dir)
    fp32 = Placement(placement.device, "fp32")
    ref = Predictor(net, card, fp32, channels_last=channels_last)
    check: dict[str, Any] = {"parity": {"fp32": parity(ref, version_dir, card)}}
    if check["parity"]["fp32"]["passed"] is False:
        why = _failures(check["parity"]["fp32"])
        raise ParityRefused(
            f"{card.version}: refused: serving at fp32 does not reproduce what training "
            f"computed: {why} (the preprocessing or decoder differs from the one it was "
            "trained with, or model.json was edited)"
        )
    predictor = ref
    if placement.precision != "fp32":
        probe_x = _probe_batch(ref, PROBE_IMAGES)
        ref_top1 = ref.top1(probe_x)
        predictor = Predictor(net, card, placement, channels_last=channels_last)
        agreement = float((predictor.top1(probe_x) == ref_top1).float().mean())
        reduced = parity(predictor, version_dir, card)
        check.update({"agreement_with_fp32": agreement, "probes": PROBE_IMAGES,
                      "requested": placement.precision})  # fmt: skip
        check["parity"][placement.precision] = reduced
        reason = None
        if reduced["passed"] is False:
            reason = f"{placement.precision} fails the probes: {_failures(reduced)}"
        elif agreement < AGREEMENT_MIN:
            reason = (f"{placement.precision} agrees with fp32 on {100 * agreement:.1f}% of "
                      f"{PROBE_IMAGES} images (< {100 * AGREEMENT_MIN:.0f}%)")  # fmt: skip
        if reason is not None:
            log.warning("%s: %s; serving fp32", card.version, reason)
            check["fallback"] = reason
            placement = fp32
            net, _ = load_version(version_dir)  # the fp32 weights, not bf16 rounded
            predictor = Predictor(net, card, fp32, channels_last=channels_last)
    compiled = False
    if compile_model:
        eager = predictor.model.net
        predictor.model.net = torch.compile(eager, dynamic=False)  # type: ignore[assignment]
        compiled = True
        # the compiled graph is what serves: it must reproduce the probes too
        after = parity(predictor, version_dir, card)
        check["parity"]["compiled"] = after
        if after["passed"] is False:
            log.warning("%s: compiled, it fails the probes (%s); serving it uncompiled",
                        card.version, _failures(after))  # fmt: skip
            check["compile_fallback"] = f"compiled, it fails the probes: {_failures(after)}"
            predictor.model.net, compiled = eager, False
    loaded = LoadedModel(card, predictor, placement, compiled, check)
    # Warm-up: first calls allocate and pick kernels; compiled models compile per shape.
    for bs in warmup_batch_sizes:
        x = torch.zeros(bs, 3, card.image_size, card.image_size, dtype=torch.uint8)
        loaded.run_batch(x, 1)
    log.info(
        "loaded %s on %s in %.1f s", card.version, placement.describe(), time.perf_counter() - t0
    )
    release_freed_memory()
    return loaded


def release_freed_memory() -> None:
    """Loading holds the weights several times over (file bytes, fp32, bf16); hand the
    freed heap back to the OS so the resident size is the model's, not its loading's."""
    trim()


class Registry:
    """The versions on disk and the one being served."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.current: LoadedModel | None = None
        self._swap_lock = threading.Lock()  # one activation at a time
        models_dir.mkdir(parents=True, exist_ok=True)
        # Older than 10 minutes: a partial save is seconds old only while its writer (a
        # trainer sharing this folder) is still writing it.
        removed = remove_partial_saves(models_dir, older_than_s=600)
        if removed:
            log.warning("removed %d partial save(s) left by a crash", removed)

    def active_version(self) -> str | None:
        return read_active(self.models_dir)

    def cards(self) -> list[ModelCard]:
        return list_cards(self.models_dir)

    def version_dir(self, version: str) -> Path:
        return resolve_version_dir(self.models_dir, version)

    def folder_of(self, version: str) -> Path:
        """Where a version listed by `cards` lies."""
        return self.models_dir / version

    def stored_version_dir(self, version: str) -> Path:
        """A version stored under models_dir, by name only (never a path)."""
        return stored_version_dir(self.models_dir, version)

    def candidates(self) -> list[str]:
        """Versions to try at startup: ACTIVE first, then the others newest first, so a
        corrupt ACTIVE version falls back to the previous good one."""
        active = self.active_version()
        others = [c.version for c in reversed(self.cards()) if c.version != active]
        return ([active] if active else []) + others

    def swap(self, loaded: LoadedModel, *, persist: bool = True) -> LoadedModel | None:
        """Serve `loaded` from the next batch on; persist ACTIVE atomically."""
        with self._swap_lock:
            if persist:
                write_active(self.models_dir, loaded.version)
            previous, self.current = self.current, loaded
        return previous


class FixedRegistry(Registry):
    """ALEXNET_MODEL_DIR: the one version folder this server serves (KServe's storage
    initializer puts it at /mnt/models), read-only. There is no other version and no
    ACTIVE: nothing is created, removed or written, in the folder or anywhere else. The
    folder's name does not matter; its model.json names the version."""

    def __init__(self, folder: Path) -> None:
        # (no mkdir, no partial saves removed: the folder may be a read-only mount)
        self.models_dir = self.folder = folder
        self.current = None
        self._swap_lock = threading.Lock()

    def _card(self) -> ModelCard | None:
        try:
            return read_card(self.folder)
        except CheckpointError:
            return None  # (the initial load says why; GET /v1/models lists nothing)

    def active_version(self) -> str | None:
        if self.current is not None:
            return self.current.version
        card = self._card()
        return card.version if card else None

    def cards(self) -> list[ModelCard]:
        if self.current is not None:
            return [self.current.card]
        card = self._card()
        return [card] if card else []

    def version_dir(self, version: str) -> Path:
        if version == "active":
            return self.folder
        return self.stored_version_dir(version)

    def stored_version_dir(self, version: str) -> Path:
        if version != self.active_version():
            raise CheckpointError(f"no model version {version!r}: this server serves only "
                                  f"{self.folder} (ALEXNET_MODEL_DIR)")  # fmt: skip
        return self.folder

    def folder_of(self, version: str) -> Path:
        return self.folder

    def swap(self, loaded: LoadedModel, *, persist: bool = True) -> LoadedModel | None:
        with self._swap_lock:  # never ACTIVE: there is nothing to persist
            previous, self.current = self.current, loaded
        return previous


__all__ = [
    "CheckpointError",
    "FixedRegistry",
    "LoadedModel",
    "ParityRefused",
    "Registry",
    "prepare",
]
