"""A version as a file other runtimes load: ONNX, a `torch.export` program (.pt2), or a
Triton model repository around the ONNX file.

Every format computes the same function, the one our service answers with:

- input `input`: float32 (N, 3, S, S), RGB, S the version's crop size, already
  normalised with the version's mean and std (pixels / 255, minus mean, over std: what
  torchvision's models take); N is dynamic;
- output `probabilities`: float32 (N, num_classes), the softmax of the logits divided by
  the version's calibration temperature.

The labels, the preprocessing (sizes, resize policy, mean, std) and the version's name go
into the file's metadata (ONNX `metadata_props`, the .pt2 archive's extra files, Triton's
labels.txt). Nothing is kept that was not checked: the file is written under a temp name
beside its final one, loaded back by its runtime (ONNX Runtime, `torch.export.load`) and
run on real images next to our fp32 model on the CPU through the serving path (decode,
eval transform, `Classifier`); it is renamed into place only when every probability agrees
within `TOLERANCE`, and removed otherwise.

onnx, onnxscript and onnxruntime (the `export` extra) are imported only for the ONNX and
Triton formats; .pt2 needs torch alone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn

from model import files
from model.checkpoint import VERSION_RE, ModelCard, load_version
from model.device import Placement
from model.engine import forward_logits
from model.images import DecodeLimits, ImageError
from model.transforms import MAX_ASPECT

FORMATS: Final = ("onnx", "pt2", "triton")
INPUT_NAME: Final = "input"
OUTPUT_NAME: Final = "probabilities"
TOLERANCE: Final = 1e-4  # max absolute probability difference to our fp32 model
EXTRA_MODULES: Final = ("onnx", "onnxscript", "onnxruntime")  # the `export` extra
CHECK_BATCH: Final = 32  # check images run at most this many at once
TRITON_MODEL_FILE: Final = "model.onnx"
TRITON_LABELS_FILE: Final = "labels.txt"
TRITON_CONFIG_FILE: Final = "config.pbtxt"
TRITON_MODEL_VERSION: Final = "1"

Runner = Callable[[torch.Tensor], torch.Tensor]  # normalised inputs -> probabilities
CheckImage = tuple[str, bytes]  # (a name for the report, the file's bytes)


class ExportError(Exception):
    """An export that cannot be made or did not pass its check; nothing was kept."""


class MissingExtra(ExportError):
    """A format's Python packages are not installed (`modules`: which)."""

    def __init__(self, fmt: str, modules: Sequence[str]) -> None:
        super().__init__(f"--format {fmt} needs {', '.join(modules)}, which cannot be imported")
        self.fmt, self.modules = fmt, list(modules)


class TargetExists(ExportError):
    """The output file or model folder is there already (`force` replaces it)."""


class ProbabilityModel(nn.Module):
    """The exported function: a normalised batch -> the version's probabilities."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.temperature = float(temperature)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(input).float()
        if self.temperature != 1.0:  # as `Classifier`: no division at all when uncalibrated
            logits = logits / self.temperature
        return F.softmax(logits, dim=1)


# ------------------------------------------------------------------------------ metadata


def preprocessing_metadata(card: ModelCard) -> dict[str, Any]:
    """How a caller turns an image into `input`, in full (model/transforms.py)."""
    return {
        **card.preprocessing.to_dict(),
        "interpolation": "bilinear",
        "antialias": True,
        "max_aspect": MAX_ASPECT,  # center_crop: the longer side first cut to 3x the shorter
        "pixel_scale": 255,  # uint8 / 255 -> [0, 1], then (x - mean) / std per channel
        "channels": "RGB",
        "layout": "NCHW",
    }


def metadata(card: ModelCard) -> dict[str, str]:
    """The key/value pairs every export carries (ONNX metadata_props, .pt2 extra files)."""
    return {
        "alexnet.version": card.version,
        "alexnet.arch": card.arch,
        "alexnet.num_classes": str(card.num_classes),
        "alexnet.labels": json.dumps(card.labels),
        "alexnet.preprocessing": json.dumps(preprocessing_metadata(card)),
        "alexnet.temperature": repr(card.temperature),
        "alexnet.weights_sha256": card.sha256,
        "alexnet.input": f"{INPUT_NAME}: float32 [N, 3, {card.image_size}, {card.image_size}], "
        "RGB, normalised with the preprocessing's mean and std",
        "alexnet.output": f"{OUTPUT_NAME}: float32 [N, {card.num_classes}], softmax of the "
        "logits divided by alexnet.temperature",
    }


# ------------------------------------------------------------------------------ reports


@dataclass
class CheckReport:
    """The exported file against our fp32 model on the same images."""

    runtime: str
    images: list[str]
    batch_sizes: list[int]
    max_difference: float
    tolerance: float
    worst_image: str | None = None

    @property
    def passed(self) -> bool:
        return self.max_difference <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "images": len(self.images),
                "image_names": self.images, "batch_sizes": self.batch_sizes,
                "max_difference": self.max_difference, "tolerance": self.tolerance,
                "worst_image": self.worst_image, "passed": self.passed}  # fmt: skip


@dataclass
class ExportResult:
    format: str
    version: str
    path: Path  # the file, or the Triton model's folder
    files: list[Path]
    bytes: int
    seconds: float  # export and check, without loading the version
    check: CheckReport
    images_source: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "path": str(self.path),
                "files": [str(f) for f in self.files], "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "images_source": self.images_source,
                "check": self.check.as_dict(), **self.details}  # fmt: skip


# ------------------------------------------------------------------------------ the reference


def version_check_images(version_dir: Path, card: ModelCard) -> tuple[list[CheckImage], str]:
    """The version's own probe images (real photos or the trainer's own validation
    images), or generated scenes for a version written before versions carried probes."""
    out: list[CheckImage] = []
    for p in card.probes or []:
        try:
            out.append((p["file"], (version_dir / p["file"]).read_bytes()))
        except OSError as exc:
            raise ExportError(f"{version_dir / p['file']}: unreadable probe image "
                              f"({exc.strerror or exc})") from exc  # fmt: skip
    if out:
        return out, "the version's probe images"
    from model.probes import sample_images

    return [(f"generated-{i:02d}.jpg", d) for i, d in enumerate(sample_images())], (
        "generated images (the version has no probe images)"
    )


@dataclass
class Reference:
    """Our fp32 model's answers (the serving path on the CPU) and the inputs the export
    takes for the same images."""

    names: list[str]
    inputs: torch.Tensor  # (N, 3, S, S) float32, normalised
    probabilities: torch.Tensor  # (N, C) float32


def reference(net: nn.Module, card: ModelCard, images: Sequence[CheckImage],
              limits: DecodeLimits) -> Reference:  # fmt: skip
    """Each image through `Predictor` at fp32 on the CPU: decode, eval transform,
    `Classifier` (normalise, network, temperature), softmax; and its normalised input."""
    from model.predictor import Predictor

    if not images:
        raise ExportError("no images to check the export with")
    predictor = Predictor(net, card, Placement(torch.device("cpu"), "fp32"), channels_last=False)
    decoded = []
    for name, data in images:
        try:
            decoded.append(predictor.decode(data, limits))
        except ImageError as exc:
            raise ExportError(f"check image {name}: {exc}") from exc
    batch = torch.stack(decoded)
    probs, inputs = [], []
    with torch.inference_mode():
        for start in range(0, len(batch), CHECK_BATCH):
            x = batch[start : start + CHECK_BATCH]
            probs.append(F.softmax(forward_logits(predictor.model, x), dim=1))
            inputs.append(predictor.model.norm(x).float())  # what the Classifier's net gets
    return Reference([n for n, _ in images], torch.cat(inputs), torch.cat(probs))


def compare(run: Runner, ref: Reference, *, runtime: str, tolerance: float) -> CheckReport:
    """Run the exported program on every image, in batches of up to `CHECK_BATCH`, and the
    first image alone as well (another batch size than the export was traced with)."""
    n = len(ref.names)
    batches = [(s, min(s + CHECK_BATCH, n)) for s in range(0, n, CHECK_BATCH)]
    if n > 1:
        batches.append((0, 1))
    worst, worst_i = 0.0, None
    for start, stop in batches:
        got = run(ref.inputs[start:stop])
        want = ref.probabilities[start:stop]
        if tuple(got.shape) != tuple(want.shape):
            raise ExportError(f"the {runtime} program answered shape {tuple(got.shape)} "
                              f"for a batch of {stop - start}; expected {tuple(want.shape)}")  # fmt: skip
        diff = (got.float() - want).abs().amax(dim=1)
        if not bool(torch.isfinite(diff).all()):
            diff = torch.nan_to_num(diff, nan=float("inf"))
        i = int(diff.argmax())
        if worst_i is None or float(diff[i]) > worst:
            worst, worst_i = float(diff[i]), start + i
    return CheckReport(runtime, list(ref.names), [b - a for a, b in batches], worst, tolerance,
                       ref.names[worst_i] if worst_i is not None else None)  # fmt: skip


# ------------------------------------------------------------------------------ formats


def require_extra(fmt: str) -> None:
    """Raise `MissingExtra` unless onnx, onnxscript and onnxruntime all import."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(fmt, missing)


def _example(card: ModelCard) -> torch.Tensor:
    # Batch 2: torch.export specialises a dimension traced at 0 or 1.
    return torch.zeros(2, 3, card.image_size, card.image_size)


def _batch_dim() -> Any:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}


def write_onnx(model: ProbabilityModel, card: ModelCard, path: Path) -> dict[str, Any]:
    """The dynamo exporter (torch.export -> onnxscript), one self-contained file."""
    program = torch.onnx.export(
        model, (_example(card),), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=_batch_dim(), dynamo=True, verbose=False, external_data=False,
    )  # fmt: skip
    if program is None:  # only for the TorchScript exporter given a file name
        raise ExportError("torch.onnx.export returned no program")
    ir = program.model
    ir.metadata_props.update(metadata(card))
    ir.doc_string = f"alexnet-service version {card.version}: {metadata(card)['alexnet.output']}"
    ir.graph.name = "alexnet"
    program.save(path, external_data=False)
    _fsync(path)
    opset = ir.opset_imports.get("", None)
    return {"opset": opset}


def onnx_runner(path: Path, card: ModelCard) -> Runner:
    """ONNX Runtime on the CPU, after onnx's checker; the file's signature and metadata
    are checked too (the file must say what it holds)."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the ONNX file is invalid: {exc}") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only, no graph-optimiser notes on stderr
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    s = card.image_size
    shapes = ([(i.name, i.shape[1:]) for i in inputs], [(o.name, o.shape[1:]) for o in outputs])
    if shapes != ([(INPUT_NAME, [3, s, s])], [(OUTPUT_NAME, [card.num_classes])]) or not (
        isinstance(inputs[0].shape[0], str)
    ):
        raise ExportError(f"the ONNX file's signature is {shapes}, with batch "
                          f"{inputs[0].shape[0]!r}: not the one expected")  # fmt: skip
    meta = session.get_modelmeta().custom_metadata_map
    if {k: meta.get(k) for k in metadata(card)} != metadata(card):
        raise ExportError("the ONNX file's metadata is not the version's")

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)

    return run


def write_pt2(model: ProbabilityModel, card: ModelCard, path: Path) -> dict[str, Any]:
    program = torch.export.export(model, (_example(card),), dynamic_shapes=_batch_dim())
    torch.export.save(program, path, extra_files=metadata(card))
    _fsync(path)
    return {}


def pt2_runner(path: Path, card: ModelCard) -> Runner:
    """`torch.export.load` and its module; the extra files must hold the metadata."""
    extra = dict.fromkeys(metadata(card), "")
    program = torch.export.load(path, extra_files=extra)
    if extra != metadata(card):
        raise ExportError("the .pt2 file's extra files do not hold the version's metadata")
    module = program.module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = module(x)
        return out

    return run


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------ Triton


def triton_config(card: ModelCard, name: str, *, max_batch_size: int,
                  max_queue_delay_us: int) -> str:  # fmt: skip
    """config.pbtxt for Triton's ONNX Runtime backend (text protobuf, `ModelConfig`)."""
    s = card.image_size
    return f"""\
# alexnet-service version {card.version} ({card.arch}, {card.num_classes} classes), written by
# `alexnet export --format triton`.
# input: RGB {s}x{s} (resize policy {card.resize}, resize size {card.resize_size}), pixels / 255,
#   normalised with mean {list(card.mean)} and std {list(card.std)}
# output: the softmax of the logits divided by the temperature {card.temperature!r}
name: "{name}"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, {s}, {s} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {card.num_classes} ]
    label_filename: "{TRITON_LABELS_FILE}"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
"""


def triton_labels(card: ModelCard) -> bytes:
    bad = [lab for lab in card.labels if "\n" in lab or "\r" in lab]
    if bad:
        raise ExportError(f"label {bad[0]!r} holds a line break: Triton's labels.txt has one "
                          "label per line")  # fmt: skip
    return "".join(f"{lab}\n" for lab in card.labels).encode()


# ------------------------------------------------------------------------------ the export


def export_version(
    version_dir: Path,
    fmt: str,
    output_dir: Path,
    *,
    name: str = "alexnet",
    check_images: Sequence[CheckImage] | None = None,
    limits: DecodeLimits | None = None,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 2000,
    force: bool = False,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export the version in `version_dir` as `fmt` into `output_dir`:
    `<version>.onnx`, `<version>.pt2`, or the Triton model `<name>/` (config.pbtxt,
    labels.txt, 1/model.onnx). Checked before it is kept (see the module's doc); an
    existing target is an error unless `force`. Raises `ExportError` (nothing written),
    `CheckpointError` for a version that cannot be loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "pt2":
        require_extra(fmt)
    if fmt == "triton" and not VERSION_RE.fullmatch(name):
        raise ExportError(f"invalid Triton model name {name!r}: letters, digits, '.', '_' "
                          "and '-' (at most 64, not first)")  # fmt: skip
    if not 1 <= max_batch_size <= 1_000_000:
        raise ExportError(f"max_batch_size must be at least 1, got {max_batch_size}")
    net, card = load_version(version_dir)
    if check_images is None:
        images, source = version_check_images(version_dir, card)
    else:
        images, source = list(check_images), "the given images"
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / (name if fmt == "triton" else f"{card.version}.{fmt}")
    if target.exists() and not force:
        raise TargetExists(f"{target} already exists")

    started = time.perf_counter()
    ref = reference(net, card, images, limits or DecodeLimits())
    model = ProbabilityModel(net, card.temperature).eval()
    # A hidden temp name beside the target (a file's keeps its suffix: torch.export.load
    # wants .pt2); a crash leaves it to `files.remove_partial_saves`.
    tmp = output_dir / (files.tmp_name(target.name) + ("" if fmt == "triton" else f".{fmt}"))
    try:
        if fmt == "triton":
            tmp.mkdir()
            (tmp / TRITON_MODEL_VERSION).mkdir()
            model_file = tmp / TRITON_MODEL_VERSION / TRITON_MODEL_FILE
            details = write_onnx(model, card, model_file)
            files.write_file_durably(tmp / TRITON_LABELS_FILE, triton_labels(card))
            config = triton_config(card, name, max_batch_size=max_batch_size,
                                   max_queue_delay_us=max_queue_delay_us)  # fmt: skip
            files.write_file_durably(tmp / TRITON_CONFIG_FILE, config.encode())
            files.fsync_dir(tmp / TRITON_MODEL_VERSION)
            files.fsync_dir(tmp)
            runner, runtime = onnx_runner(model_file, card), "onnxruntime"
            details |= {"name": name, "max_batch_size": max_batch_size}
        elif fmt == "onnx":
            details = write_onnx(model, card, tmp)
            runner, runtime = onnx_runner(tmp, card), "onnxruntime"
        else:
            details = write_pt2(model, card, tmp)
            runner, runtime = pt2_runner(tmp, card), "torch.export"
        report = compare(runner, ref, runtime=runtime, tolerance=tolerance)
        del runner  # an ONNX Runtime session holds the file open
        if not report.passed:
            raise ExportError(
                f"the {fmt} export does not reproduce the model: a probability differs by "
                f"{report.max_difference:.3g} on {report.worst_image} (tolerance "
                f"{tolerance:g}, {runtime} against our fp32 model); nothing was kept"
            )
        _move_into_place(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    seconds = time.perf_counter() - started
    written = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    size = sum(p.stat().st_size for p in written)
    return ExportResult(fmt, card.version, target, written, size, seconds, report, source,
                        details)  # fmt: skip


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing folder is moved aside first and removed after
    (a file is replaced atomically by the rename itself)."""
    old = None
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(files.tmp_name(target.name + ".old"))
        os.rename(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    files.fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
