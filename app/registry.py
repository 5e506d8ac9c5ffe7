"""Model versions as the service sees them: load, validate, warm up, hot swap.

`LoadedModel` is immutable; swapping replaces the registry's reference between batches.
Requests keep the LoadedModel they were preprocessed for, so none mixes versions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.memory import trim
from model import probes, quantize
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
from model.device import Placement, cpu_has_fast_bf16
from model.files import atomic_write_bytes, remove_partial_saves
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


def _calibration(ref: Predictor, version_dir: Path, card: ModelCard) -> torch.Tensor:
    """What int8 calibrates on (model/quantize.py): built-in images rendered with another
    seed than `_probe_batch`'s (the agreement check's stay unseen), and the version's probe
    files through the serving decode; as the network's inputs (normalised floats)."""
    size = card.resize_size
    imgs = [torch.from_numpy(render(quantize.CALIBRATION_SEED, i, size)[0]).permute(2, 0, 1)
            for i in range(quantize.CALIBRATION_IMAGES)]  # fmt: skip
    x = ref.inputs(torch.stack(imgs))
    files = [ref.decode((version_dir / p["file"]).read_bytes(), DecodeLimits())
             for p in card.probes or []]  # fmt: skip
    if files:
        x = torch.cat([x, torch.stack(files)])
    with torch.no_grad():
        out: torch.Tensor = ref.model.norm(x).float()
    return out


def _candidates(placement: Placement, card: ModelCard, cache_dir: Path | None,
                sizes: tuple[int, ...]) -> list[tuple[str, bool]]:  # fmt: skip
    """The reduced precisions to try, best first, each with whether it may be built now
    (int8: quantized and compiled) or only taken from the cache."""
    p = placement.precision
    if p == "int8":
        return [("int8", True)] + ([("bf16", True)] if cpu_has_fast_bf16() else [])
    out = [(p, True)] if p != "fp32" else []
    # auto: int8 only from a cached program that passed the guard before (built by an
    # explicit ALEXNET_PRECISION=int8 load) and measured faster than fp32 there (and than
    # bf16 where the CPU has fast bf16): auto never pays quantize + compile at load. (A
    # cache from before the speed was measured: where the CPU has VNNI or AMX.)
    if placement.auto and placement.device.type == "cpu" and quantize.available():
        key = quantize.cache_key(card.sha256, card.image_size)
        folder = quantize.cached(cache_dir, card.version, key, sizes)
        if folder is not None:
            speed = quantize.measured_speedup_of(quantize.read_meta(folder))
            if (all(v > 1.0 for v in speed.values()) if speed
                    else quantize.cpu_has_fast_int8()):  # fmt: skip
                out.insert(0, ("int8", False))
    return out


def _best_time(p: Predictor, x: torch.Tensor, rounds: int = 3) -> float:
    """Seconds `p` takes for the batch `x`: the best of `rounds` after one warm-up call
    (which compiles a compiled model)."""
    p.top1(x)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        p.top1(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def _int8_speed(cand: Predictor, ref: Predictor, version_dir: Path, card: ModelCard,
                device: torch.device, sizes: tuple[int, ...], channels_last: bool,
                probe_x: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """How many times faster the int8 program runs the largest batch than fp32 (`ref`) and,
    where the CPU has fast bf16 (what `auto` serves otherwise), than bf16: measured once,
    at the first load, and kept with the cached program (~2-6 s at 224 px on 2 cores)."""
    x = _timing_batch(probe_x, ref, sizes[-1])
    t_int8 = max(_best_time(cand, x), 1e-9)
    out = {"speedup_vs_fp32": round(_best_time(ref, x) / t_int8, 3)}
    if cpu_has_fast_bf16():
        bf16 = Predictor(load_version(version_dir)[0], card, Placement(device, "bf16"),
                         channels_last=channels_last)  # fmt: skip
        out["speedup_vs_bf16"] = round(_best_time(bf16, x) / t_int8, 3)
        del bf16
    slower = {k: v for k, v in out.items() if v <= 1.0}
    if slower:
        log.warning("%s: int8 measured %s on this CPU (batch %d): auto will not choose it",
                    card.version, ", ".join(f"{v:.2f}x {k[11:]}" for k, v in slower.items()),
                    sizes[-1])  # fmt: skip
    return out


def _timing_batch(probe_x: torch.Tensor | None, ref: Predictor, size: int) -> torch.Tensor:
    x = probe_x if probe_x is not None else _probe_batch(ref, min(size, PROBE_IMAGES))
    return x.repeat(-(-size // len(x)), 1, 1, 1)[:size]


COMPILE_GAIN_MIN = 1.03  # compiled must be >= 3% faster to be kept: less is noise here


def compile_key(
    card: ModelCard, placement: Placement, size: int, channels_last: bool
) -> dict[str, Any]:
    """What the compile-or-not decision depends on: the graph (architecture, classes,
    input size), where and how it runs, torch and the CPU."""
    return {"arch": card.arch, "num_classes": card.num_classes, "image_size": card.image_size,
            "device": str(placement.device), "precision": placement.precision, "batch": size,
            "channels_last": channels_last, "torch": torch.__version__,
            "cpu": quantize.cpu_kind()}  # fmt: skip


def _compile_decision_file(cache_dir: Path | None, key: dict[str, Any]) -> Path | None:
    return None if cache_dir is None else cache_dir / "compile" / f"{quantize.key_hash(key)}.json"


def read_compile_decision(cache_dir: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    """A decision an earlier `auto` load measured for this key (None: none, unreadable)."""
    f = _compile_decision_file(cache_dir, key)
    if f is None:
        return None
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("key") == key and isinstance(doc.get("compile"), bool)
    return doc if ok else None


def _write_compile_decision(cache_dir: Path | None, key: dict[str, Any],
                            doc: dict[str, Any]) -> str:  # fmt: skip
    f = _compile_decision_file(cache_dir, key)
    if f is None:
        return "off"
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(f, json.dumps({"key": key, **doc}, indent=1, sort_keys=True).encode())
    except OSError as exc:
        log.warning("compile decision not cached in %s: %s", f.parent, exc.strerror or exc)
        return "unwritable"
    return "miss"


def _int8_predictor(ref: Predictor, version_dir: Path, card: ModelCard, device: torch.device,
                    sizes: tuple[int, ...], cache_dir: Path | None,
                    allow_build: bool) -> tuple[Predictor, quantize.Built]:  # fmt: skip
    built = quantize.build(
        lambda: load_version(version_dir)[0],  # fresh fp32 weights, contiguous
        lambda: _calibration(ref, version_dir, card),
        version=card.version, key=quantize.cache_key(card.sha256, card.image_size),
        sizes=sizes, image_size=card.image_size, cache_dir=cache_dir, allow_build=allow_build,
    )  # fmt: skip
    # the program is the network (the normalisation before it stays fp32 in Classifier)
    predictor = Predictor(built.program, card, Placement(device, "int8"), channels_last=False)
    return predictor, built


def prepare(
    version_dir: Path,
    placement: Placement,
    *,
    channels_last: bool = True,
    compile_model: bool | str = False,
    warmup_batch_sizes: tuple[int, ...] = (1, 8),
    cache_dir: Path | None = None,
    min_agreement: float = AGREEMENT_MIN,
) -> LoadedModel:
    """Load and validate a version, place it, and check it before serving:

    1. the parity probes at fp32 (model/probes.py): a failure refuses the version
       (`ParityRefused`, naming the probe and the difference);
    2. at a reduced precision, the probes within that precision's tolerance and top-1
       agreement with fp32 on `PROBE_IMAGES` built-in images (>= `min_agreement`,
       ALEXNET_MIN_AGREEMENT, 99% by default); either failing
       tries the next precision (int8 -> bf16 where the CPU has fast bf16 -> fp32) and
       says why (`precision_check.fallback`).

    int8 (model/quantize.py) is checked as the compiled program that serves it, one per
    batch size in `warmup_batch_sizes`, cached under `cache_dir` (None: no cache). An
    `auto` placement tries int8 first only where such a program is already cached and
    passed this check before.

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
    predictor, served = ref, fp32  # (each candidate gets its own copy of the weights)
    sizes = tuple(sorted(set(warmup_batch_sizes))) or (1,)
    candidates = _candidates(placement, card, cache_dir, sizes)
    reasons: list[str] = []
    if candidates:
        probe_x = _probe_batch(ref, PROBE_IMAGES)
        ref_top1 = ref.top1(probe_x)
        check.update({"probes": PROBE_IMAGES, "agreement": {},
                      "requested": "auto" if placement.auto else placement.precision})  # fmt: skip
    for precision, allow_build in candidates:
        built: quantize.Built | None = None
        if precision == "int8":
            try:
                cand, built = _int8_predictor(ref, version_dir, card, placement.device, sizes,
                                              cache_dir, allow_build)  # fmt: skip
            except Exception as exc:  # int8 that cannot be built here: a fallback, not a crash
                why = f"int8 could not be built: {type(exc).__name__}: {exc}"
                log.warning("%s: %s", card.version, why)
                reasons.append(why)
                continue
        else:
            cand = Predictor(load_version(version_dir)[0], card,
                             Placement(placement.device, precision),
                             channels_last=channels_last)  # fmt: skip
        reason: str | None = None
        try:
            agreement = float((cand.top1(probe_x) == ref_top1).float().mean())
            reduced = parity(cand, version_dir, card)
            check["agreement"][precision] = check["agreement_with_fp32"] = agreement
            check["parity"][precision] = reduced
            if built is not None:
                check["int8"] = {"agreement_with_fp32": agreement, **built.describe()}
            if reduced["passed"] is False:
                reason = f"{precision} fails the probes: {_failures(reduced)}"
            elif agreement < min_agreement:
                reason = (f"{precision} agrees with fp32 on {100 * agreement:.1f}% of "
                          f"{PROBE_IMAGES} images (< {100 * min_agreement:g}%)")  # fmt: skip
            if built is not None:
                speed = quantize.measured_speedup_of(built.meta)
                if reason is None and not speed and built.folder is not None:
                    speed = _int8_speed(cand, ref, version_dir, card, placement.device, sizes,
                                        channels_last, probe_x)  # fmt: skip
                check["int8"].update(speed)
                quantize.record_guard(built, reason is None, agreement, speed)
        except Exception as exc:  # a program that loads but fails to run: the next one
            reason = f"{precision} failed to run: {type(exc).__name__}: {exc}"[:500]
            if built is not None:
                quantize.record_guard(built, False, 0.0)
        if reason is None:
            predictor, served = cand, cand.placement
            break
        log.warning("%s: %s; trying the next precision", card.version, reason)
        reasons.append(reason)
    if reasons:
        check["fallback"] = "; ".join(reasons)
        log.warning("%s: serving %s", card.version, served.precision)
    placement = served
    compiled = placement.precision == "int8"  # (AOTInductor: compiled already)
    measured_compiled = False  # ALEXNET_COMPILE=auto compiled it to measure, and kept it
    if compile_model == "auto" and not compiled:
        decision = _decide_compile(predictor, ref, card, placement, sizes, channels_last,
                                   probe_x if candidates else None, cache_dir, check)  # fmt: skip
        compile_model, measured_compiled = decision is not False, decision is None
    if compile_model and not compiled:
        eager = getattr(predictor.model.net, "_orig_mod", predictor.model.net)
        if not measured_compiled:
            predictor.model.net = torch.compile(eager, dynamic=False)  # type: ignore[assignment]
        compiled = True
        # the compiled graph is what serves: it must reproduce the probes too
        try:
            after = parity(predictor, version_dir, card)
        except Exception as exc:  # no C++ compiler (any more), an unsupported op...
            after = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        check["parity"]["compiled"] = after
        if after["passed"] is False:
            why = after.get("error") or f"it fails the probes: {_failures(after)}"
            log.warning("%s: compiled, %s; serving it uncompiled", card.version, why)
            check["compile_fallback"] = f"compiled, {why}"
            predictor.model.net, compiled = eager, False
    loaded = LoadedModel(card, predictor, placement, compiled, check)
    # Warm-up: first calls allocate and pick kernels; compiled models compile per shape.
    try:
        _warm_up(loaded, warmup_batch_sizes)
    except Exception as exc:
        if not compiled or placement.precision == "int8":
            raise
        why = f"compiling a warm-up batch size failed: {type(exc).__name__}: {exc}"[:300]
        log.warning("%s: %s; serving it uncompiled", card.version, why)
        check["compile_fallback"] = why
        predictor.model.net = getattr(predictor.model.net, "_orig_mod", predictor.model.net)
        loaded = LoadedModel(card, predictor, placement, False, check)
        _warm_up(loaded, warmup_batch_sizes)
    log.info(
        "loaded %s on %s in %.1f s", card.version, placement.describe(), time.perf_counter() - t0
    )
    release_freed_memory()
    return loaded


def _decide_compile(predictor: Predictor, ref: Predictor, card: ModelCard, placement: Placement,
                    sizes: tuple[int, ...], channels_last: bool, probe_x: torch.Tensor | None,
                    cache_dir: Path | None, check: dict[str, Any]) -> bool | None:  # fmt: skip
    """ALEXNET_COMPILE=auto: whether to compile, from the decision cached for this graph,
    machine and torch, or else from a measurement now (eager against compiled at the
    largest batch size; compiled kept only when >= `COMPILE_GAIN_MIN` faster). Returns
    True/False for the caller to act on, or None where the measurement compiled the model
    and kept it compiled. `check["compile"]` says which and why."""
    top = sizes[-1]
    key = compile_key(card, placement, top, channels_last)
    known = read_compile_decision(cache_dir, key)
    if known is not None:
        check["compile"] = {"mode": "auto", "cache": "hit", "compile": known["compile"],
                            "speedup": known.get("speedup"), "batch": top}  # fmt: skip
        return bool(known["compile"])
    x = _timing_batch(probe_x, ref, top)
    eager_net = predictor.model.net
    t_eager = _best_time(predictor, x)
    t0 = time.perf_counter()
    predictor.model.net = torch.compile(eager_net, dynamic=False)  # type: ignore[assignment]
    try:
        t_comp = _best_time(predictor, x)
    except Exception as exc:  # no compiler, an unsupported op: eager, and say so
        predictor.model.net = eager_net
        check["compile"] = {"mode": "auto", "cache": "off", "compile": False,
                            "error": f"{type(exc).__name__}: {exc}"[:300]}  # fmt: skip
        log.warning("%s: torch.compile failed (%s): serving it uncompiled", card.version, exc)
        return False
    speedup = t_eager / max(t_comp, 1e-9)
    keep = speedup >= COMPILE_GAIN_MIN
    status = _write_compile_decision(cache_dir, key, {"compile": keep, "speedup": round(speedup, 3),
                                                      "measured_at": time.time()})  # fmt: skip
    check["compile"] = {"mode": "auto", "cache": status, "compile": keep,
                        "speedup": round(speedup, 3), "batch": top,
                        "measure_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
    log.info("%s: torch.compile measured %.2fx eager at batch %d: %s", card.version, speedup,
             top, "compiled" if keep else "eager")  # fmt: skip
    if not keep:
        predictor.model.net = eager_net
        return False
    return None


def _warm_up(loaded: LoadedModel, sizes: tuple[int, ...]) -> None:
    card = loaded.card
    for bs in sizes:
        x = torch.zeros(bs, 3, card.image_size, card.image_size, dtype=torch.uint8)
        loaded.run_batch(x, 1)


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
