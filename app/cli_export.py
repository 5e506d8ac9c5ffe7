"""`alexnet export VERSION --format onnx|pt2|triton`: a version as an ONNX file, a
`torch.export` program or a Triton model repository, checked against our fp32 model before
it is kept (model/export.py). Nothing heavy is imported until the command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Final

FORMATS: Final = ("onnx", "pt2", "triton")  # model/export.py: FORMATS (not imported: torch)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


EXTRA_HINT: Final = "pip install 'alexnet-service[export]'"


class ExportCliError(Exception):
    pass


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a version as ONNX, a torch.export program or a Triton model",
        description="Write a version for another runtime: input `input` (float32 [N, 3, S, "
        "S], RGB, normalised with the version's mean and std), output `probabilities` "
        "(float32 [N, classes], with the version's temperature); the labels, preprocessing "
        "and version in its metadata. The file is run by its runtime on real images (the "
        "version's probe images, or --check-images) next to our fp32 model and kept only "
        "if every probability agrees within 1e-4. onnx and triton need the export extra "
        f"({EXTRA_HINT}).",
    )
    p.add_argument("model", metavar="VERSION|PATH", help="a version name, `active` or a folder")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx: VERSION.onnx; pt2: VERSION.pt2 (torch.export.save); triton: "
                   "a model repository entry NAME/{config.pbtxt, labels.txt, 1/model.onnx}")  # fmt: skip
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="where to write (created if needed; default: the current folder; "
                   "triton: the model repository)")  # fmt: skip
    p.add_argument("--name", help="triton: the model's name (default: ALEXNET_MODEL_NAME, "
                   "alexnet)")  # fmt: skip
    p.add_argument("--max-batch-size", type=_positive, metavar="N",
                   help="triton: max_batch_size (default: ALEXNET_MAX_BATCH_SIZE, 32)")  # fmt: skip
    p.add_argument("--check-images", action="append", metavar="PATH",
                   help="check on these image files or folders (repeatable) instead of the "
                   "version's probe images")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.add_argument("--json", action="store_true")


def _check_images(paths: list[str]) -> list[tuple[str, bytes]]:
    from app.cli_predict import expand_images

    out = []
    for image in expand_images(paths):
        if image.problem:
            raise ExportCliError(f"--check-images {image.name}: {image.problem}")
        try:
            out.append((image.name, image.path.read_bytes()))
        except OSError as exc:
            raise ExportCliError(f"--check-images {image.name}: cannot read: "
                                 f"{exc.strerror or exc}") from exc  # fmt: skip
    return out


def run_export(args: argparse.Namespace, settings: Any) -> int:
    if args.format != "triton":
        for opt, value in (("--name", args.name), ("--max-batch-size", args.max_batch_size)):
            if value is not None:
                raise ExportCliError(f"{opt} is for --format triton")
    images = _check_images(args.check_images) if args.check_images else None
    from model.checkpoint import resolve_version_dir
    from model.export import ExportError, MissingExtra, TargetExists, export_version
    from model.images import DecodeLimits

    output = args.output if args.output is not None else Path.cwd()
    limits = DecodeLimits(max_pixels=settings.max_image_pixels, max_side=settings.max_image_side)
    try:
        result = export_version(
            resolve_version_dir(settings.models_dir, args.model),
            args.format,
            output,
            name=args.name or settings.model_name,
            check_images=images,
            limits=limits,
            max_batch_size=args.max_batch_size or settings.max_batch_size,
            max_queue_delay_us=round(settings.max_batch_wait_ms * 1000),
            force=args.force,
        )
    except MissingExtra as exc:
        raise ExportCliError(
            f"alexnet export --format {exc.fmt} needs the export extra: {EXTRA_HINT} "
            f"(cannot import {', '.join(exc.modules)})"
        ) from exc
    except TargetExists as exc:
        raise ExportCliError(f"{exc} (--force replaces it)") from exc
    except ExportError as exc:
        raise ExportCliError(str(exc)) from exc
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    check = result.check
    what = {"onnx": "an ONNX file", "pt2": "a torch.export program",
            "triton": "a Triton model (ONNX Runtime backend)"}[result.format]  # fmt: skip
    opset = f", opset {result.details['opset']}" if result.details.get("opset") else ""
    print(f"exported {result.version} as {what}{opset}: {result.path} "
          f"({result.bytes / 1e6:,.1f} MB, {result.seconds:.1f} s)")  # fmt: skip
    if result.format == "triton":
        for f in result.files:
            print(f"  {f}")
    sizes = ", ".join(str(b) for b in check.batch_sizes)
    print(f"  checked with {check.runtime} against our fp32 model on {len(check.images)} "
          f"images ({result.images_source}; batches of {sizes}): max probability "
          f"difference {check.max_difference:.2e} (tolerance {check.tolerance:.0e})")  # fmt: skip
    return 0
