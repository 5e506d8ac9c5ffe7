"""`alexnet feedback export --dataset NAME` (labelled feedback as an imagefolder dataset,
through the datasets' own writer) and `alexnet feedback stats` (GET /admin/feedback's
numbers, from the same records)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from app.datasets import dataset_store
from app.feedback import FeedbackStore, export_members
from app.settings import Settings
from model.datasets import DatasetImportError


class FeedbackCliError(Exception):
    pass


def add_parser(sub: Any) -> None:
    p = sub.add_parser("feedback", help="export labelled feedback as a dataset, or its numbers")
    p.add_argument("action", choices=["export", "stats"])
    p.add_argument("--dataset", metavar="NAME",
                   help="export: the dataset to write (train with imagefolder:NAME)")  # fmt: skip
    p.add_argument("--replace", action="store_true", help="export: replace a dataset of "
                   "that name")  # fmt: skip
    p.add_argument("--json", action="store_true")


def open_store(s: Settings) -> FeedbackStore:
    return FeedbackStore(s.feedback_dir, s.db_path, max_bytes=s.feedback_max_bytes,
                         retention_s=s.feedback_retention_days * 86_400,
                         holdout_share=s.holdout_split)  # fmt: skip


def run_feedback(args: argparse.Namespace, s: Settings) -> int:
    store = open_store(s)
    try:
        if args.action == "stats":
            summary = store.summary()
            if args.json:
                print(json.dumps(summary, indent=2))
                return 0
            print(f"{summary['kept']} kept answers ({summary['labelled']} labelled, "
                  f"{summary['bytes'] / 1e6:.1f} MB); labelled: {summary['splits']['train']} "
                  f"train, {summary['splits']['holdout']} holdout")  # fmt: skip
            for v in summary["versions"]:
                t = v["top1"]
                if not v["labelled"]:
                    print(f"  {v['version']}: no labelled answers yet")
                    continue
                print(f"  {v['version']}: top-1 {t['accuracy']:.1%} of {v['labelled']} "
                      f"(95% CI {t['low']:.1%}-{t['high']:.1%})")  # fmt: skip
            return 0
        if not args.dataset:
            raise FeedbackCliError("feedback export needs --dataset NAME")
        skipped: list[str] = []
        try:
            man = dataset_store(s).import_members(
                lambda: export_members(store, skipped), args.dataset,
                source="labelled feedback", replace=args.replace)  # fmt: skip
        except DatasetImportError as exc:
            raise FeedbackCliError(
                f"{exc}{' (' + '; '.join(skipped) + ')' if skipped else ''}"
            ) from exc
        totals = man.split_totals()
        if args.json:
            print(json.dumps({**man.summary(), "left_out": skipped}, indent=2))
        else:
            print(f"dataset {man.name}: {len(man.classes)} classes, {len(man.images)} images "
                  f"({totals.get('train', 0)} train, {totals.get('holdout', 0)} holdout: the "
                  f"feedback holdout); train with --dataset imagefolder:{man.name}")  # fmt: skip
            for line in skipped:
                print(f"  left out: {line}")
        return 0
    finally:
        store.close()
