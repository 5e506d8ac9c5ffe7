"""The train/serve parity check carried by every version.

When a version is written it gets a few probe images: real image files (PNG or JPEG) in
`<version>/probes/`, each with its sha256 and its fp32 answer in model.json, computed on
the CPU by the code that made the version: the trainer's own data path (its dataset's
decode, its square resize, its batched eval transform) for a trained version, torchvision's
own transforms on PIL images for an imported torchvision version. The serving path (the
bytes through `Predictor.decode`, the model at its precision, softmax with the version's
temperature) must reproduce them when the version is loaded:

- the same top-1 on every probe, unless the expected top-2 is within the tolerance of the
  top-1 (a tie at that precision, not a disagreement);
- each of the expected top-5 probabilities within `TOLERANCE[precision]` (absolute), and
  each of their logits within `LOGIT_TOLERANCE[precision]` of the probe's logit spread.

Each probe file's hash is in model.json, so a changed probe file is refused like changed
weights (the expected answers are as trustworthy as model.json itself).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

log = logging.getLogger(__name__)

PROBES_DIR: Final = "probes"
COUNT: Final = 8  # probes per version
CANDIDATES: Final = 64  # validation images scored to choose them
MAX_FILE_BYTES: Final = 256 * 1024  # a larger source file is re-encoded (JPEG) smaller
# What a probe may differ by, per precision, on each of its expected top-5 classes:
# - the probability, absolutely (TOLERANCE);
# - the logit (before the temperature), relative to the spread of the probe's logits over
#   all classes (their standard deviation: LOGIT_TOLERANCE). Scale-free, so it also holds a
#   version whose probabilities are all close (few classes learnt, or a high temperature)
#   to its preprocessing, where a probability difference says little.
# fp32 leaves room for another CPU's or GPU's float sums and for the trainer's and the
# server's resize arithmetic (the trainer squares the shorter side first); reduced
# precisions for their rounding (bf16 keeps 8 bits of mantissa, fp16 11). Measured on a
# 2-core EPYC (docs/benchmarks.md): bf16 moves logits by <= 0.014 of their spread; another
# mean or a resize 8 px larger by 0.06 to 0.4.
# "tf32": fp32 on CUDA with TF32 matmuls or convolutions allowed (cuDNN's default for
# convolutions), which round inputs to 10 bits of mantissa: not measured yet (no GPU), set
# between fp32 and fp16.
# "int8" (model/quantize.py: uint8 activations per tensor, int8 weights per channel):
# measured on the same EPYC (bench/int8.py), int8 moves logits by 0.048 (a 64-px test
# version) and 0.055 (the 224-px 1000-class model) of their spread, probabilities by 0.008
# and 0.004: set with room above that, and still below what a wrong preprocessing moves.
TOLERANCE: Final = {"fp32": 0.02, "tf32": 0.04, "fp16": 0.05, "bf16": 0.12, "int8": 0.12}
LOGIT_TOLERANCE: Final = {"fp32": 0.04, "tf32": 0.05, "fp16": 0.06, "bf16": 0.1, "int8": 0.15}


def tolerance_key(placement: Any) -> str:
    """Which tolerances a placement is held to: its precision, or "tf32" for fp32 on a
    CUDA device that lets TF32 in."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    if placement.precision == "fp32" and placement.device.type == "cuda" and tf32:
        return "tf32"
    return str(placement.precision)


class ParityError(Exception):
    """The serving path does not reproduce a version's probes."""


@dataclass
class Probe:
    """One probe as written: its file's bytes and name, and the expected answer."""

    data: bytes
    ext: str
    label: int | None  # its true label, when it has one (validation data)
    probs: torch.Tensor  # (C,) fp32 probabilities the writer computed (with temperature)
    logits: torch.Tensor  # (C,) fp32 logits the writer computed (before it)


def encode_png(chw: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def shrink(data: bytes, side: int) -> tuple[bytes, str]:
    """A smaller JPEG of a large source file: its shorter side at `side` (never below the
    resize size, so serving does not upsample it)."""
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    scale = side / min(img.size)
    if scale < 1:
        img = img.resize((max(side, round(img.width * scale)), max(side, round(img.height * scale))),
                         Image.Resampling.LANCZOS)  # fmt: skip
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), "jpg"


_EXTS: Final = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def sniffed_ext(data: bytes) -> str | None:
    """The file name extension of an image's format, from its bytes (None: another)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXTS.get(im.format or "")
    except Exception:  # what Pillow cannot open is re-encoded or skipped by the caller
        return None


def select(candidates: Sequence[Probe], count: int = COUNT) -> list[Probe]:
    """The `count` candidates with the widest top-1 margin, one per predicted class first
    (a parity check wants answers that a small difference cannot flip, and variety)."""

    def margin(p: Probe) -> float:
        top: list[float] = p.probs.topk(min(2, p.probs.numel())).values.tolist()
        return top[0] - (top[1] if len(top) > 1 else 0.0)

    ranked = sorted(candidates, key=margin, reverse=True)
    chosen: list[Probe] = []
    seen: set[int] = set()
    for p in ranked:
        top1 = int(p.probs.argmax())
        if top1 not in seen:
            chosen.append(p)
            seen.add(top1)
        if len(chosen) == count:
            return chosen
    chosen += [p for p in ranked if all(p is not c for c in chosen)][: count - len(chosen)]
    return chosen


def card_entries(probes: Sequence[Probe], labels: Sequence[str],
                 top_k: int = 5) -> tuple[list[dict[str, Any]], dict[str, bytes]]:  # fmt: skip
    """model.json's `probes` and the files to write under `probes/`."""
    entries, files = [], {}
    for i, p in enumerate(probes):
        name = f"{PROBES_DIR}/{i:02d}.{p.ext}"
        values, idx = p.probs.topk(min(top_k, p.probs.numel()))
        entries.append({
            "file": name, "sha256": hashlib.sha256(p.data).hexdigest(),
            "label": labels[p.label] if p.label is not None else None,
            "logit_std": round(float(p.logits.std()), 6),
            "top5": [{"index": int(j), "label": labels[int(j)], "probability": round(float(v), 6),
                      "logit": round(float(p.logits[int(j)]), 5)}
                     for v, j in zip(values, idx, strict=True)],
        })  # fmt: skip
        files[name] = p.data
    return entries, files


# ------------------------------------------------------------------ the trainer's side


def dataset_item(ds: Dataset[Any], i: int) -> tuple[Dataset[Any], int]:
    """The dataset that holds item `i` of `ds` and its index there (through Subset and
    ConcatDataset)."""
    while True:
        if isinstance(ds, Subset):
            ds, i = ds.dataset, int(ds.indices[i])  # type: ignore[attr-defined]
        elif isinstance(ds, ConcatDataset):
            k = int(np.searchsorted(ds.cumulative_sizes, i, side="right"))
            i -= ds.cumulative_sizes[k - 1] if k else 0
            ds = ds.datasets[k]
        else:
            return ds, i


def training_probes(net: torch.nn.Module, val: Dataset[Any], pre: Any, temperature: float,
                    *, count: int = COUNT) -> list[Probe]:  # fmt: skip
    """Probes from the first `CANDIDATES` validation images, answered by the trainer's
    code: each image as its dataset yields it to the loader (an image file decoded and
    squared by `ImageFiles.load`; a rendered or in-memory tensor as it is, written as a
    lossless PNG), then the validation transform and the model in fp32 on the CPU."""
    from model.data import ImageFiles
    from model.device import Placement
    from model.engine import for_inference, forward_logits
    from model.transforms import EvalTransform

    n = min(CANDIDATES, len(val))  # type: ignore[arg-type]
    if n == 0:
        return []
    sources: list[tuple[bytes, str, int, torch.Tensor]] = []
    for i in range(n):
        ds, j = dataset_item(val, i)
        if isinstance(ds, ImageFiles):
            path, label = ds.files[j]
            data = path.read_bytes()
            ext = sniffed_ext(data)  # by content: a feedback snapshot's files have no suffix
            if len(data) > MAX_FILE_BYTES or ext is None:
                data, ext = shrink(data, 2 * ds.side)
            sources.append((data, ext, label, ds.load(data)))
        else:
            x, label = val[i]
            sources.append((encode_png(x), "png", int(label), x))
    model = for_inference(net, pre, Placement(torch.device("cpu"), "fp32"), channels_last=False)
    tf = EvalTransform(pre)
    outs = []
    for start in range(0, n, 16):
        xs = torch.stack([tf(s[3]) for s in sources[start : start + 16]])
        with torch.inference_mode():
            outs.append(forward_logits(model, xs))
    logits = torch.cat(outs)
    probs = F.softmax(logits / temperature, dim=1)
    return select([Probe(d, e, lab, probs[k], logits[k])
                   for k, (d, e, lab, _) in enumerate(sources)], count)  # fmt: skip


# ------------------------------------------------------------------ the server's side


@dataclass
class ParityReport:
    precision: str
    tolerance: float
    logit_tolerance: float
    probes: int = 0
    max_diff: float = 0.0
    max_logit_diff: float = 0.0  # relative to each probe's logit spread
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "probes": self.probes, "passed": self.passed,
                "max_difference": round(self.max_diff, 6), "tolerance": self.tolerance,
                "max_logit_difference": round(self.max_logit_diff, 6),
                "logit_tolerance": self.logit_tolerance,
                "failed": len(self.failures), "failures": self.failures[:5]}  # fmt: skip


def check(entries: Sequence[dict[str, Any]], version_dir: Path, precision: str,
          scores: Callable[[bytes], tuple[torch.Tensor, torch.Tensor]]) -> ParityReport:  # fmt: skip
    """Run each probe file through `scores` (bytes -> (C,) probabilities and logits: the
    serving path) and compare with what model.json expects. Raises `ParityError` for a
    missing or changed probe file (the version is not what was written)."""
    tol = TOLERANCE.get(precision, TOLERANCE["fp16"])
    ltol = LOGIT_TOLERANCE.get(precision, LOGIT_TOLERANCE["fp16"])
    report = ParityReport(precision, tol, ltol)
    for e in entries:
        path = version_dir / e["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ParityError(f"probe {e['file']}: unreadable ({exc.strerror or exc})") from exc
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise ParityError(f"probe {e['file']}: sha256 does not match model.json's: the "
                              "file is corrupt or was replaced")  # fmt: skip
        got, logits = scores(data)
        expected = e["top5"]
        diffs = [abs(float(got[t["index"]]) - t["probability"]) for t in expected]
        worst = max(diffs, default=0.0)
        report.max_diff = max(report.max_diff, worst)
        spread = max(float(e.get("logit_std") or 0.0), 1e-6)
        ldiffs = [abs(float(logits[t["index"]]) - t["logit"]) / spread
                  for t in expected if "logit" in t]  # fmt: skip
        lworst = max(ldiffs, default=0.0)
        report.max_logit_diff = max(report.max_logit_diff, lworst)
        report.probes += 1
        top1, served = expected[0], int(got.argmax())
        tie = len(expected) > 1 and expected[0]["probability"] - expected[1]["probability"] <= tol
        if served != top1["index"] and not tie:
            report.failures.append(
                f"probe {e['file']}: top-1 {got_label(served, expected, got)} where the writer "
                f"answered {top1['label']!r} ({top1['probability']:.4f})")  # fmt: skip
        elif worst > tol:
            k = diffs.index(worst)
            t = expected[k]
            report.failures.append(
                f"probe {e['file']}: p({t['label']!r}) {float(got[t['index']]):.4f} where the "
                f"writer computed {t['probability']:.4f} (difference {worst:.4f} > {tol} at "
                f"{precision})")  # fmt: skip
        elif lworst > ltol:
            t = [t for t in expected if "logit" in t][ldiffs.index(lworst)]
            report.failures.append(
                f"probe {e['file']}: logit({t['label']!r}) {float(logits[t['index']]):.4f} where "
                f"the writer computed {t['logit']:.4f} ({lworst:.3f} of the probe's logit "
                f"spread > {ltol} at {precision})")  # fmt: skip
    return report


def got_label(index: int, expected: Sequence[dict[str, Any]], got: torch.Tensor) -> str:
    names = {t["index"]: t["label"] for t in expected}
    return f"{names.get(index, f'class {index}')!r} ({float(got[index]):.4f})"


def sample_images(count: int = COUNT) -> list[bytes]:
    """The probe images an imported version carries: generated scenes (the built-in
    shapes on colour ramps, with noise) as JPEGs, half landscape 320x240 and half portrait
    240x320, so the resize of the shorter side and the centre crop both do work."""
    from model.synthetic import render

    out = []
    for i in range(count):
        arr, _ = render(4242, i, 320)
        img = Image.fromarray(arr)
        img = img.crop((0, 40, 320, 280)) if i % 2 == 0 else img.crop((40, 0, 280, 320))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def torchvision_probes(net: torch.nn.Module, transforms: Callable[[Image.Image], torch.Tensor],
                       images: Sequence[bytes]) -> list[Probe]:  # fmt: skip
    """Probes answered the torchvision way: each file opened with PIL, through the weights'
    own `transforms()` (resize, crop, to tensor, normalise), then the network in fp32 on
    the CPU. A drift between torchvision's preprocessing and this service's shows here."""
    xs = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            xs.append(transforms(im.convert("RGB")))
    net = net.cpu().float().eval()
    with torch.inference_mode():
        logits = net(torch.stack(xs)).float()
    probs = F.softmax(logits, dim=1)
    return [Probe(d, "jpg", None, probs[i], logits[i]) for i, d in enumerate(images)]
