"""`alexnet datasets list | show NAME | import ARCHIVE|FOLDER --name NAME | delete NAME`:
the same store and checks as /admin/datasets (app/datasets.py, model/datasets.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.datasets import check_not_in_use, dataset_store
from app.jobs.store import JobStore
from model.datasets import DatasetImportError, Manifest


class DatasetCliError(Exception):
    pass


def add_parser(sub: Any) -> None:
    p = sub.add_parser("datasets", help="import, list, show or delete datasets")
    p.add_argument("action", nargs="?", choices=["list", "show", "import", "delete"],
                   default="list")  # fmt: skip
    p.add_argument("target", nargs="?", metavar="NAME|ARCHIVE|FOLDER",
                   help="show/delete: the dataset's name; import: a zip, tar, tar.gz or a "
                   "folder of class folders")  # fmt: skip
    p.add_argument("--name", help="import: the dataset's name (train with imagefolder:NAME)")
    p.add_argument("--replace", action="store_true", help="import: replace a dataset of "
                   "that name")  # fmt: skip
    p.add_argument("--json", action="store_true")


def _print_manifest(m: Manifest) -> None:
    print(f"{m.name}: {len(m.classes)} classes, {len(m.images)} images, "
          f"{m.total_bytes / 1e6:.1f} MB, {m.layout}, hash {m.hash[:12]}")  # fmt: skip
    splits = sorted({s for per in m.counts().values() for s in per})
    print(f"  {'CLASS':<24} " + " ".join(f"{s.upper():>9}" for s in splits))
    for cls, per in m.counts().items():
        print(f"  {cls[:24]:<24} " + " ".join(f"{per.get(s, 0):>9}" for s in splits))
    h = m.holdout
    print(
        f"  holdout: {h['images']} images ({h['from']}"
        + (f", {h['share']:.0%} of each class" if h.get("share") else "")
        + ")"
    )
    if m.skipped:
        print(f"  skipped {len(m.skipped)} file(s):")
        for s in m.skipped[:20]:
            print(f"    {s['path']}: {s['reason']}")
        if len(m.skipped) > 20:
            print(f"    ... and {len(m.skipped) - 20} more (--json lists them all)")


def run_datasets(args: argparse.Namespace, s: Any) -> int:
    store = dataset_store(s)
    try:
        return _run(args, s, store)
    except DatasetImportError as exc:
        raise DatasetCliError(str(exc)) from exc


def _run(args: argparse.Namespace, s: Any, store: Any) -> int:
    if args.action == "list":
        rows = []
        for n in store.names():
            try:
                rows.append(store.get(n, build=False).summary())
            except FileNotFoundError:
                rows.append({"name": n, "manifest": False})
        if args.json:
            print(json.dumps({"datasets": rows}, indent=2))
        elif not rows:
            print(f"no datasets in {store.data_dir} (alexnet datasets import ARCHIVE --name NAME)")
        else:
            print(f"  {'NAME':<24} {'CLASSES':>7} {'IMAGES':>7} {'HOLDOUT':>7} {'MB':>8}  CREATED")
            for r in rows:
                if not r.get("manifest", True):
                    print(f"  {r['name']:<24} (made by hand: its manifest is made at first use)")
                    continue
                print(f"  {r['name']:<24} {r['num_classes']:>7} {r['images']:>7} "
                      f"{r['holdout']['images']:>7} {r['bytes'] / 1e6:>8.1f}  {r['created_at']}")  # fmt: skip
        return 0
    if not args.target:
        raise DatasetCliError(f"datasets {args.action} needs a "
                              + ("NAME" if args.action != "import" else "ARCHIVE or FOLDER"))  # fmt: skip
    if args.action == "show":
        m = store.get(args.target)
        print(json.dumps(m.as_json(), indent=2)) if args.json else _print_manifest(m)
        return 0
    jobs = JobStore(s.db_path)
    try:
        if args.action == "delete":
            freed = store.delete(args.target,
                                 guard=lambda: check_not_in_use(jobs, args.target, "delete"))  # fmt: skip
            if args.json:
                print(json.dumps({"deleted": args.target, "freed_bytes": freed}))
            else:
                print(f"deleted dataset {args.target} ({freed / 1e6:.1f} MB)")
            return 0
        name = args.name
        if not name:
            raise DatasetCliError("datasets import needs --name NAME")
        if args.replace:
            check_not_in_use(jobs, name, "replace")

        def not_in_use() -> None:
            if args.replace:
                check_not_in_use(jobs, name, "replace")

        src = Path(args.target)
        if src.is_dir():
            m = store.import_folder(src, name, replace=args.replace, guard=not_in_use)
        elif src.is_file():
            with src.open("rb") as f:
                m = store.import_archive(f, name, source=f"file {src.name}",
                                         replace=args.replace, guard=not_in_use)  # fmt: skip
        else:
            raise DatasetCliError(f"{src}: no such file or folder")
    finally:
        jobs.close()
    if args.json:
        print(json.dumps(m.as_json(), indent=2))
    else:
        _print_manifest(m)
        print(f"train on it: alexnet train --dataset imagefolder:{m.name} --base active")
    return 0
