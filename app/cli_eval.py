"""`alexnet evaluate`: run `model.evaluation` for the command line and print its report
(one summary line, a per-class table and the confusion matrix; or one JSON document)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Final

from model.evaluation import EvalReport

# Above this many classes the text shows only the worst classes and no matrix.
MAX_TEXT_CLASSES: Final = 20
WORST_SHOWN: Final = 10

_SPLIT_TEXT: Final = {
    "holdout": "holdout: the dataset's frozen holdout, never trained on",
    "val": "val: the validation split",
    "all": "all: train + val",
}


def run_evaluate(args: argparse.Namespace, settings: Any) -> int:
    from model.checkpoint import load_version, resolve_version_dir
    from model.device import eager_placement, resolve
    from model.evaluation import evaluate_version

    net, card = load_version(resolve_version_dir(settings.models_dir, args.model))
    placement = eager_placement(resolve(settings.device, settings.precision))
    report = evaluate_version(
        net,
        card,
        args.dataset,
        split=args.split,
        data_dir=settings.data_dir,
        placement=placement,
        batch_size=args.batch_size,
        channels_last=settings.channels_last,
        holdout_share=settings.holdout_split,
    )
    if args.json:
        print(json.dumps({**report.as_json(), **placement.describe()}, indent=2))
    else:
        print("\n".join(render_text(report)))
    return 0


def render_text(report: EvalReport) -> list[str]:
    r = report.result
    where = _SPLIT_TEXT[report.split]
    if report.includes_training_images:
        where += ", including the version's training images"
    top5 = f"  top-5 {r.top5:.2%}" if report.top5 is not None else ""
    lines = [
        f"{report.version} on {report.dataset} ({where}; {r.count} images): "
        f"loss {r.loss:.4f}  top-1 {r.top1:.2%}{top5}"
    ]
    rows = report.per_class()
    many = len(rows) > MAX_TEXT_CLASSES
    if many:
        rows = sorted((c for c in rows if c["count"]), key=lambda c: (c["accuracy"], -c["count"]))
        rows = rows[:WORST_SHOWN]
        lines.append(f"\nworst {len(rows)} of {len(report.labels)} classes:")
    else:
        lines.append("\nper class:")
    width = max([len("LABEL")] + [len(c["label"]) for c in rows])
    lines.append(f"  {'LABEL':<{width}}  {'COUNT':>6}  {'CORRECT':>7}  {'ACCURACY':>8}")
    for c in rows:
        acc = f"{c['accuracy']:.1%}" if c["accuracy"] is not None else "-"
        lines.append(f"  {c['label']:<{width}}  {c['count']:>6}  {c['correct']:>7}  {acc:>8}")
    if many:
        lines.append("\nthe confusion matrix is in --json (confusion_matrix)")
        return lines
    lines.append("\nconfusion matrix (rows: true label, columns: predicted, by index):")
    matrix = report.confusion
    cell = max(3, len(str(max(max(row) for row in matrix))) + 1)
    label_w = max(len(f"{i} {lab}") for i, lab in enumerate(report.labels))
    lines.append("  " + " " * label_w + "".join(f"{i:>{cell}}" for i in range(len(matrix))))
    for i, (label, row) in enumerate(zip(report.labels, matrix, strict=True)):
        lines.append(f"  {f'{i} {label}':<{label_w}}" + "".join(f"{n:>{cell}}" for n in row))
    return lines
