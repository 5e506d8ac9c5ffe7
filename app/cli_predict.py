"""`alexnet predict`: image arguments (files and folders) -> the top-k of each, printed as
text or as the HTTP batch API's `results` list. A file that cannot be classified is
reported once, on stderr, and makes the exit status 1."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.data import IMAGE_SUFFIXES


class PredictError(Exception):
    """A one-line usage error (e.g. --top-k out of range)."""


@dataclass(frozen=True)
class ImageArg:
    """One image to classify: `name` is its path as the user gave it (for a file found in
    a folder: the folder argument joined with the path below it); `problem` is why there
    is nothing to decode, if known before reading."""

    name: str
    path: Path
    problem: str | None = None


def expand_images(args: list[str]) -> list[ImageArg]:
    """Files as given; folders recursively, image files by suffix, in sorted order (hidden
    files and folders are left out)."""
    out: list[ImageArg] = []
    for arg in args:
        path = Path(arg)
        if not path.is_dir():
            out.append(ImageArg(arg, path))
            continue
        found = sorted(
            f.relative_to(path)
            for f in path.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        )
        found = [f for f in found if not any(p.startswith(".") for p in f.parts)]
        if not found:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            out.append(ImageArg(arg, path, f"the folder has no image files ({suffixes})"))
        # The argument's own spelling ("./photos/" stays "./photos/..."), not Path's.
        out += [ImageArg(f"{arg.rstrip('/')}/{f.as_posix()}", path / f) for f in found]
    return out


def top_k_for(requested: int | None, num_classes: int) -> int:
    """The default is 5, or every class of a model with fewer (as the HTTP API)."""
    from model.engine import default_top_k

    if requested is None:
        return default_top_k(num_classes)
    if not 1 <= requested <= num_classes:
        raise PredictError(
            f"--top-k must be between 1 and the model's {num_classes} classes, got {requested}"
        )
    return requested


def run_predict(args: argparse.Namespace, settings: Any) -> int:
    import torch

    from model.checkpoint import load_version, resolve_version_dir
    from model.device import eager_placement, resolve
    from model.images import DecodeLimits, ImageError
    from model.predictor import Predictor

    if args.top_k is not None and args.top_k < 1:
        raise PredictError(f"--top-k must be at least 1, got {args.top_k}")
    net, card = load_version(resolve_version_dir(settings.models_dir, args.model))
    top_k = top_k_for(args.top_k, card.num_classes)
    predictor = Predictor(net, card, eager_placement(resolve(settings.device, settings.precision)),
                          channels_last=settings.channels_last)  # fmt: skip
    limits = DecodeLimits(max_pixels=settings.max_image_pixels, max_side=settings.max_image_side)
    results: list[dict[str, Any]] = []
    inputs: list[tuple[int, torch.Tensor]] = []
    for image in expand_images(args.images):
        results.append({"filename": image.name})
        try:
            if image.problem:
                raise _Unreadable("no_images", image.problem)
            try:
                data = image.path.read_bytes()
            except OSError as exc:  # the reason only: the path is reported beside it
                raise _Unreadable("unreadable_file", f"cannot read: {exc.strerror or exc}") from exc
            inputs.append((len(results) - 1, predictor.decode(data, limits)))
        except (_Unreadable, ImageError) as exc:
            results[-1]["error"] = {"code": exc.code, "message": str(exc)}
    rows = predictor.classify([t for _, t in inputs], top_k)
    for (i, _), predictions in zip(inputs, rows, strict=True):
        results[i]["predictions"] = predictions
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "predictions" in r:
                print(r["filename"])
                for p in r["predictions"]:
                    print(f"  {p['probability']:7.2%}  {p['label']} ({p['index']})")
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"alexnet: skipped {r['filename']}: {r['error']['message']}", file=sys.stderr)
    return 1 if failed else 0


class _Unreadable(Exception):
    """Nothing to decode: a missing or unreadable file, a folder without images."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
