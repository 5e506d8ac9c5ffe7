"""The on-disk model format: `<models>/<version>/{weights.safetensors, model.json}` and the
`ACTIVE` pointer.

Writes are atomic (temp file or folder, fsync, rename, fsync of the parent: model/files.py),
so a crash at any moment leaves the previous state intact. Loading never unpickles: weights are
safetensors, metadata is JSON, and both are validated before a single weight is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from model import files
from model.network import ARCHS, build_model, count_parameters
from model.transforms import RESIZE_POLICIES, Preprocessing

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
WEIGHTS_FILE: Final = "weights.safetensors"
CARD_FILE: Final = "model.json"
ACTIVE_FILE: Final = "ACTIVE"
VERSION_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch only
PROBE_FILE_RE: Final = re.compile(r"probes/[0-9]{2}\.(png|jpg|jpeg|webp|gif|bmp)")
RELIABILITY_FILE: Final = "reliability.png"


class CheckpointError(Exception):
    """A model version that cannot be read or trusted. The message names the file and
    what is wrong with it."""


class ModelCard(BaseModel):
    """model.json: everything needed to rebuild, preprocess for and describe a version."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format_version: int
    version: str
    arch: str
    num_classes: int = Field(ge=2)
    labels: list[str]
    image_size: int = Field(ge=63, le=1024)
    resize_size: int = Field(ge=63, le=2048)
    resize: str = "center_crop"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: str | None = None
    # The content hash of the data it was trained on (an imagefolder's manifest hash).
    dataset_hash: str | None = None
    # ...and of the holdout it was kept away from (the promotion's fairness check).
    holdout_hash: str | None = None
    train_config: dict[str, Any] | None = None
    parent: str | None = None
    source: str = "training"
    created_at: str
    num_parameters: int | None = None
    sha256: str
    # Temperature scaling (model/calibration.py): {temperature, ece_before, ece_after,
    # nll_before, nll_after, bins, n, ...}; None: probabilities are the plain softmax.
    calibration: dict[str, Any] | None = None
    # The parity check (model/probes.py): files under probes/ with their sha256 and the
    # writer's fp32 top-5; None for a version written before versions carried them.
    probes: list[dict[str, Any]] | None = None
    # Each label's share of the training images (the drift gauge's reference).
    label_distribution: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if len(self.labels) != self.num_classes:
            raise ValueError(
                f"{len(self.labels)} labels for num_classes={self.num_classes}: they must match"
            )
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}")
        if not VERSION_RE.fullmatch(self.version):
            raise ValueError(f"invalid version name {self.version!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def temperature(self) -> float:
        """What logits are divided by before the softmax (1.0 when not calibrated)."""
        return float((self.calibration or {}).get("temperature", 1.0))  # checked: _trust_fields

    @model_validator(mode="after")
    def _trust_fields(self) -> ModelCard:
        """The calibration, probes and label distribution are read by the serving path:
        every number it uses is checked here, so a bad model.json is a CheckpointError
        (the version is refused), never a failure later."""
        n = self.num_classes
        if self.calibration is not None:
            t = self.calibration.get("temperature")
            if not _finite(t) or not 0.01 <= float(t) <= 100:  # type: ignore[arg-type]
                raise ValueError(
                    f"calibration.temperature must be a number in [0.01, 100], got {t!r}"
                )
        for p in self.probes or []:
            name = p.get("file") if isinstance(p, dict) else None
            if not isinstance(name, str) or not PROBE_FILE_RE.fullmatch(name):
                raise ValueError(f"probes: invalid probe file name {name!r}")
            if not isinstance(p.get("sha256"), str) or not re.fullmatch(
                r"[0-9a-f]{64}", p["sha256"]
            ):
                raise ValueError(f"probes: {name}: sha256 must be 64 hex digits")
            if "logit_std" in p and (not _finite(p["logit_std"]) or p["logit_std"] < 0):
                raise ValueError(f"probes: {name}: logit_std must be a finite number >= 0")
            top = p.get("top5")
            if not isinstance(top, list) or not 1 <= len(top) <= 5:
                raise ValueError(f"probes: {name}: top5 must list 1 to 5 classes")
            for t in top:
                ok = (isinstance(t, dict) and isinstance(t.get("index"), int)
                      and 0 <= t["index"] < n and _finite(t.get("probability"))
                      and 0 <= t["probability"] <= 1
                      and ("logit" not in t or _finite(t["logit"])))  # fmt: skip
                if not ok:
                    raise ValueError(f"probes: {name}: each top5 entry needs an index in "
                                     f"[0, {n}), a probability in [0, 1] and a finite logit")  # fmt: skip
        d = self.label_distribution
        if d is not None and (len(d) != n or not all(_finite(x) and x >= 0 for x in d)
                              or sum(d) <= 0):  # fmt: skip
            raise ValueError(f"label_distribution must hold {n} finite shares >= 0, not all 0")
        return self

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            image_size=self.image_size,
            resize_size=self.resize_size,
            resize=self.resize,
            mean=self.mean,
            std=self.std,
        )

    def fine_tune_defaults(self, given: Collection[str]) -> dict[str, Any]:
        """The training options a fine-tune from this version takes from it: its name as
        `base`, and its image size and arch unless `given`."""
        out: dict[str, Any] = {"base": self.version}
        for name in ("image_size", "arch"):
            if name not in given:
                out[name] = getattr(self, name)
        return out

    def summary(self) -> dict[str, Any]:
        """The short form listed by GET /v1/models and `alexnet models list`."""
        return {
            "version": self.version,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "dataset": self.dataset,
            "dataset_hash": self.dataset_hash,
            "source": self.source,
            "parent": self.parent,
            "created_at": self.created_at,
            "metrics": self.metrics,
            "calibrated": self.calibration is not None,
        }


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- versions


def new_version_id(now: datetime | None = None) -> str:
    """`YYYYMMDD-HHMMSS-xxxx`: sorts by creation time, unique across processes."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_version_name(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise CheckpointError(
            f"invalid version name {version!r}: letters, digits, '.', '_' and '-' only"
        )
    return version


def weights_bytes(net: nn.Module) -> bytes:
    """The state dict as safetensors bytes: fp32, contiguous, on the CPU."""
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()
    }
    return st_save(tensors)


def save_version(
    models_dir: Path,
    net: nn.Module,
    *,
    arch: str,
    labels: list[str],
    pre: Preprocessing,
    metrics: dict[str, Any] | None = None,
    dataset: str | None = None,
    dataset_hash: str | None = None,
    holdout_hash: str | None = None,
    train_config: dict[str, Any] | None = None,
    parent: str | None = None,
    source: str = "training",
    version: str | None = None,
    weights: bytes | None = None,
    calibration: dict[str, Any] | None = None,
    probes: list[dict[str, Any]] | None = None,
    label_distribution: list[float] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> ModelCard:
    """Write a new version atomically and return its card.

    Every file (the weights, model.json and `extra_files`: probe images, the reliability
    diagram) goes into a hidden temp folder that is fsynced and then renamed to
    `<models>/<version>`: the version appears whole or not at all.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    version = check_version_name(version or new_version_id())
    final = models_dir / version
    if final.exists():
        raise CheckpointError(f"version {version!r} already exists in {models_dir}")
    data = weights if weights is not None else weights_bytes(net)
    card = ModelCard(
        format_version=FORMAT_VERSION,
        version=version,
        arch=arch,
        num_classes=len(labels),
        labels=list(labels),
        image_size=pre.image_size,
        resize_size=pre.resize_size,
        resize=pre.resize,
        mean=pre.mean,
        std=pre.std,
        metrics=metrics or {},
        dataset=dataset,
        dataset_hash=dataset_hash,
        holdout_hash=holdout_hash,
        train_config=train_config,
        parent=parent,
        source=source,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        num_parameters=count_parameters(net),
        sha256=sha256_bytes(data),
        calibration=calibration,
        probes=probes,
        label_distribution=label_distribution,
    )
    tmp = models_dir / files.tmp_name(version)
    tmp.mkdir()
    try:
        files.write_file_durably(tmp / WEIGHTS_FILE, data)
        for name, blob in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            files.write_file_durably(tmp / name, blob)
            if (tmp / name).parent != tmp:
                files.fsync_dir((tmp / name).parent)
        files.write_file_durably(tmp / CARD_FILE, card_json(card))
        files.fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files.fsync_dir(models_dir)
    log.info("saved model version %s (%s, %d classes)", version, arch, len(labels))
    return card


def card_json(card: ModelCard) -> bytes:
    return (json.dumps(card.model_dump(mode="json"), indent=2) + "\n").encode()


def read_card(version_dir: Path) -> ModelCard:
    """Read and validate model.json (not the weights)."""
    path = version_dir / CARD_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing (is {version_dir} a model version?)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    fv = raw.get("format_version")
    if fv != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {fv!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "model.json"
        raise CheckpointError(f"{path}: {where}: {first['msg']}") from exc


def load_version(version_dir: Path) -> tuple[nn.Module, ModelCard]:
    """Load and validate a version; returns the network (fp32, CPU, eval mode) and its card.

    Checks, in order: model.json schema and format version, the weights' sha256, that the
    file is safetensors (never pickle), tensor names and shapes against the architecture,
    and that every value is finite. Any failure raises `CheckpointError`.
    """
    card = read_card(version_dir)
    wpath = version_dir / WEIGHTS_FILE
    try:
        data = wpath.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{wpath}: unreadable: {exc.strerror or exc}") from exc
    digest = sha256_bytes(data)
    if digest != card.sha256:
        raise CheckpointError(
            f"{wpath}: sha256 {digest[:12]}... does not match model.json's "
            f"{card.sha256[:12]}...: the file is corrupt or was replaced"
        )
    net = build_model(card.arch, num_classes=card.num_classes, init=None)
    load_weights(net, data, source=str(wpath))
    net.eval()
    return net, card


def load_weights(net: nn.Module, data: bytes, *, source: str) -> None:
    """Validate safetensors `data` against `net`'s parameters and load it."""
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types on any bad header
        raise CheckpointError(f"{source}: not a valid safetensors file ({exc})") from exc
    check_state_dict(net, tensors, source=source)
    net.load_state_dict(tensors, strict=True)


def check_state_dict(net: nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source}: tensor names do not match the architecture "
            f"(missing: {missing[:3]}, unexpected: {extra[:3]})"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {got.dtype}, expected float")
        if not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values")


def iter_version_dirs(models_dir: Path) -> Iterator[Path]:
    if not models_dir.is_dir():
        return
    for child in sorted(models_dir.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and VERSION_RE.fullmatch(child.name):
            yield child


def list_cards(models_dir: Path) -> list[ModelCard]:
    """Every readable version's card, oldest first; unreadable ones are logged and skipped."""
    cards = []
    for d in iter_version_dirs(models_dir):
        try:
            cards.append(read_card(d))
        except CheckpointError as exc:
            log.warning("skipping unreadable model version: %s", exc)
    return cards


def read_active(models_dir: Path) -> str | None:
    try:
        name = (models_dir / ACTIVE_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name if VERSION_RE.fullmatch(name) else None


def write_active(models_dir: Path, version: str) -> None:
    """Point ACTIVE at `version` atomically (the version must exist)."""
    check_version_name(version)
    if not (models_dir / version / CARD_FILE).is_file():
        raise CheckpointError(f"no model version {version!r} in {models_dir}")
    files.atomic_write_bytes(models_dir / ACTIVE_FILE, (version + "\n").encode())


def stored_version_dir(models_dir: Path, version: str) -> Path:
    """A version stored under `models_dir`, by name only (never a path)."""
    check_version_name(version)
    path = models_dir / version
    if not (path / CARD_FILE).is_file():
        raise CheckpointError(f"no model version {version!r}")
    return path


def resolve_version_dir(models_dir: Path, ref: str) -> Path:
    """`ref` is a version name, `active`, or a path to a version folder."""
    if ref == "active":
        active = read_active(models_dir)
        if active is None:
            raise CheckpointError(f"no active model version in {models_dir}")
        ref = active
    candidate = Path(ref)
    if (candidate / CARD_FILE).is_file() and (os.sep in ref or ref.startswith(".")):
        return candidate
    if VERSION_RE.fullmatch(ref) and (models_dir / ref / CARD_FILE).is_file():
        return models_dir / ref
    if (candidate / CARD_FILE).is_file():
        return candidate
    raise CheckpointError(f"unknown model version {ref!r} (not in {models_dir}, not a folder)")
