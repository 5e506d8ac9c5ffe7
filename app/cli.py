"""The `alexnet` command: serve, train, evaluate, calibrate, predict, export, models,
datasets, feedback, gc, import-torchvision.

Exit status: 0 success, 1 a runtime error (one line on stderr), 2 bad usage,
75 training interrupted with its resumable state saved (resume with --resume RUN_DIR).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from model.run import EXIT_ERROR, EXIT_USAGE

log = logging.getLogger("alexnet")


class CliError(Exception):
    """A one-line error for the user; `main` prints it and exits 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One clear line instead of argparse's usage dump."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _train_options(p: argparse.ArgumentParser) -> None:
    from model.run import add_config_options

    add_config_options(p)  # one per TrainConfig field, its bounds and defaults stated there
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) on this node")
    p.add_argument("--nnodes", default="1", metavar="N|MIN:MAX",
                   help="nodes (torchrun; MIN:MAX is elastic, needs --rdzv-endpoint)")  # fmt: skip
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="torchrun restarts every rank up to K times after one dies; they go on "
                   "from the last saved state (see --checkpoint-every-steps)")  # fmt: skip
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="the c10d rendezvous the nodes meet at (one of them, reachable by all)")  # fmt: skip
    p.add_argument("--resume-if-saved", action="store_true", help=argparse.SUPPRESS)  # ranks
    p.add_argument(
        "--resume",
        metavar="RUN_DIR|VERSION",
        help="a run folder to continue exactly (VERSION: the older spelling of --base)",
    )
    p.add_argument("--activate", action="store_true", help="make the new version active")
    p.add_argument("--run-dir", type=Path, help="where the run's state, plot and log go")
    p.add_argument("--events-file", type=Path, help="append progress events as JSON lines")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="record the run in MLflow there (default: ALEXNET_MLFLOW_TRACKING_URI)")  # fmt: skip
    p.add_argument("--mlflow-experiment", metavar="NAME",
                   help="MLflow experiment (default: ALEXNET_MLFLOW_EXPERIMENT, else the dataset)")  # fmt: skip
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard event files in the run folder (default: ALEXNET_TENSORBOARD)")  # fmt: skip
    # Admin jobs: the service decides about activation itself, after loading the version.
    p.add_argument("--keep-active", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--writer-tag", help=argparse.SUPPRESS)  # names its temp files


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alexnet", description="Train and serve AlexNet image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="start the HTTP service")
    p.add_argument("--host", help="default: ALEXNET_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: ALEXNET_PORT or 8000")

    _train_options(sub.add_parser("train", help="train a model version"))

    p = sub.add_parser("evaluate", help="loss, top-1, per-class accuracy and confusion matrix")
    p.add_argument("model", metavar="VERSION|PATH")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", choices=["all", "val", "holdout"],
                   help="holdout (never trained on; default when the dataset has one), val "
                        "(the version's validation split; the default otherwise) or all")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("calibrate", help="fit a temperature for a version (a new version)",
                       description="Fit a temperature on the dataset's validation split, "
                       "measure ECE and NLL before and after on its holdout, and write the "
                       "result as a new version (same weights, the old one as its parent) "
                       "with its reliability diagram and fresh parity probes.")  # fmt: skip
    p.add_argument("model", metavar="VERSION|PATH")
    p.add_argument("--dataset", required=True, help="a dataset with the version's labels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--activate", action="store_true", help="make the new version active")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="classify image files and folders (recursively)")
    p.add_argument("model", metavar="VERSION|PATH")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, help="default 5, or every class of a model with fewer")
    p.add_argument("--json", action="store_true")

    from app.cli_export import add_parser as add_export

    add_export(sub)

    p = sub.add_parser("models", help="list versions, activate or delete one")
    p.add_argument("action", nargs="?", choices=["list", "activate", "delete"], default="list")
    p.add_argument("version", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("gc", help="report and free disk space nothing needs")
    p.add_argument("--dry-run", action="store_true", help="report only")
    p.add_argument("--keep-versions", type=int, metavar="N",
                   help="also delete versions older than the newest N that nothing uses")  # fmt: skip
    p.add_argument("--json", action="store_true")

    from app.cli_datasets import add_parser as add_datasets

    add_datasets(sub)

    from app.cli_feedback import add_parser as add_feedback

    add_feedback(sub)

    p = sub.add_parser("import-torchvision", help="import torchvision's ImageNet weights")
    p.add_argument("--weights-file", type=Path, help="a local alexnet-owt-7be5be79.pth")
    p.add_argument("--activate", action="store_true", help="make the new version active")
    return parser


def _settings() -> Any:
    from app.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        raise CliError(f"bad setting: {_first_error(exc, env=True)}") from exc


def _first_error(exc: ValidationError, *, env: bool = False) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    name = f"ALEXNET_{loc.upper()}" if env else f"--{loc.replace('_', '-')}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{name}: {msg}" if loc else msg


# ----------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.intake import body_limits
    from app.memory import configure_allocator
    from app.protocol import with_header_timeout

    s = _settings()
    if s.memory_trim_s > 0:  # 0 leaves the C allocator as it is
        configure_allocator()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host or s.host,
        port=args.port or s.port,
        timeout_graceful_shutdown=int(s.shutdown_timeout_s) or None,
        log_level=s.log_level,
        timeout_keep_alive=5,
        proxy_headers=bool(s.forwarded_allow_ips),
        forwarded_allow_ips=s.forwarded_allow_ips or None,
        http=with_header_timeout(
            s.header_timeout_s,
            write_timeout_s=s.write_timeout_s,
            max_header_bytes=s.max_header_bytes,
            max_header_connections=s.max_header_connections,
            body_limit_for=body_limits(s.max_upload_bytes, s.max_files, s.max_dataset_bytes),
        ),
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from app.cli_predict import PredictError, run_predict

    try:
        return run_predict(args, _settings())
    except PredictError as exc:
        raise CliError(str(exc)) from exc


def cmd_export(args: argparse.Namespace) -> int:
    from app.cli_export import ExportCliError, run_export

    try:
        return run_export(args, _settings())
    except ExportCliError as exc:
        raise CliError(str(exc)) from exc


def cmd_models(args: argparse.Namespace) -> int:
    from app.storage import tree_bytes
    from model.checkpoint import list_cards, load_version, read_active, write_active

    s = _settings()
    if args.action == "delete":
        return _delete_version(s, args)
    if args.action == "activate":
        if not args.version:
            raise CliError("models activate needs a VERSION")
        load_version(_version_dir(s, args.version))  # validate fully before pointing at it
        write_active(s.models_dir, args.version)
        servers = _servers_note(s, args.version)
        if args.json:
            print(json.dumps({"active": args.version, "servers": servers}))
        else:
            print(f"active version: {args.version}")
            for srv in servers:
                print(srv["note"])
        return 0
    active = read_active(s.models_dir)
    cards = list_cards(s.models_dir)
    if args.json:
        versions = [{**c.summary(), "size_bytes": tree_bytes(s.models_dir / c.version),
                     "active": c.version == active} for c in cards]  # fmt: skip
        print(json.dumps({"active": active, "versions": versions}, indent=2))
        return 0
    if not cards:
        print(f"no model versions in {s.models_dir}")
        return 0
    print(f"  {'VERSION':<22} {'ARCH':<14} {'CLASSES':>7} {'TOP-1':>7} {'SIZE':>9}  "
          f"{'DATASET':<20} CREATED")  # fmt: skip
    for c in cards:
        top1 = c.metrics.get("val_top1")
        top1_s = f"{top1:.1%}" if isinstance(top1, float) else "-"
        mark = "*" if c.version == active else " "
        size = tree_bytes(s.models_dir / c.version) / 1e6
        print(f"{mark} {c.version:<22} {c.arch:<14} {c.num_classes:>7} {top1_s:>7} "
              f"{size:>6.0f} MB  {(c.dataset or '-'):<20} {c.created_at}")  # fmt: skip
    return 0


def _delete_version(s: Any, args: argparse.Namespace) -> int:
    from app.jobs.store import JobStore
    from app.presence import serving_versions
    from app.storage import InUse, delete_version

    if not args.version:
        raise CliError("models delete needs a VERSION")
    jobs = JobStore(s.db_path)
    try:
        freed = delete_version(args.version, models_dir=s.models_dir, jobs=jobs,
                               serving=serving_versions(s.home), cache_dir=s.cache_dir)  # fmt: skip
    except InUse as exc:
        raise CliError(str(exc)) from exc
    finally:
        jobs.close()
    if args.json:
        print(json.dumps({"deleted": args.version, "freed_bytes": freed}))
    else:
        print(f"deleted version {args.version}: {_mb(freed)} freed")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def cmd_gc(args: argparse.Namespace) -> int:
    from app.jobs.store import JobStore
    from app.presence import serving_versions
    from app.storage import as_dicts, collect, free

    s = _settings()
    if args.keep_versions is not None and args.keep_versions < 0:
        raise CliError(f"--keep-versions must be at least 0, got {args.keep_versions}")
    jobs = JobStore(s.db_path)
    try:
        serving = serving_versions(s.home)
        items = collect(home=s.home, jobs=jobs, serving=serving, keep_failed=s.keep_job_state,
                        keep_versions=args.keep_versions)  # fmt: skip
        freed = 0 if args.dry_run else free(items, home=s.home, jobs=jobs, serving=serving)
    finally:
        jobs.close()
    total = sum(i.bytes for i in items)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "items": as_dicts(items),
                          "reclaimable_bytes": total, "freed_bytes": freed}, indent=2))  # fmt: skip
        return 0
    if not items:
        print(f"nothing to free in {s.home}")
        return 0
    for i in items:
        print(f"  {_mb(i.bytes):>12}  {i.kind:<12} {i.name}  ({i.why})")
    if args.dry_run:
        print(f"{_mb(total)} can be freed (dry run: nothing deleted)")
    else:
        print(f"freed {_mb(freed)}")
    return 0


def _servers_note(s: Any, version: str) -> list[dict[str, Any]]:
    """What the servers running on this home will do about a new ACTIVE."""
    from app.presence import live_servers

    out = []
    for srv in live_servers(s.home):
        watch = float(srv.get("watch_active_s") or 0)
        if watch > 0:
            note = (f"a server using {s.home} (pid {srv['pid']}) follows ACTIVE: it serves "
                    f"{version} within about {watch:g} s, once the version is loaded")  # fmt: skip
        else:
            note = (f"warning: a server using {s.home} (pid {srv['pid']}) does not follow ACTIVE "
                    f"(ALEXNET_WATCH_ACTIVE_S=0) and keeps serving its version; restart it or "
                    f"POST /admin/models/{version}/activate")  # fmt: skip
        out.append({"pid": srv["pid"], "follows_active": watch > 0, "note": note})
    return out


def _version_dir(s: Any, ref: str) -> Path:
    from model.checkpoint import resolve_version_dir

    return resolve_version_dir(s.models_dir, ref)


def cmd_import_torchvision(args: argparse.Namespace) -> int:
    from model.checkpoint import read_active, write_active
    from model.pretrained import import_torchvision

    s = _settings()
    card = import_torchvision(
        s.models_dir, weights_file=args.weights_file
    )  # no parent: new weights
    activated = args.activate or read_active(s.models_dir) is None
    if activated:
        write_active(s.models_dir, card.version)
    print(f"imported torchvision AlexNet (ImageNet, 1000 classes) as version {card.version}"
          + (" (active)" if activated else ""))  # fmt: skip
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from model.checkpoint import write_active
    from model.device import resolve
    from model.extras import calibrate_version

    s = _settings()
    placement = resolve(s.device, "fp32")
    card, cal = calibrate_version(_version_dir(s, args.model), args.dataset,
                                  models_dir=s.models_dir, data_dir=s.data_dir,
                                  device=placement.device, batch_size=args.batch_size,
                                  holdout_share=s.holdout_split)  # fmt: skip
    if args.activate:
        write_active(s.models_dir, card.version)
    if args.json:
        print(json.dumps({"version": card.version, "parent": card.parent,
                          "activated": args.activate, "calibration": card.calibration}, indent=2))  # fmt: skip
        return 0
    print(
        f"calibrated {card.parent} on {args.dataset} as version {card.version}"
        + (" (active)" if args.activate else "")
        + f": temperature {cal.temperature:.4f}"
    )
    print(
        f"  on {cal.n} {cal.measured_on} images ({cal.bins} bins): ECE {cal.ece_before:.2%} "
        f"-> {cal.ece_after:.2%}, NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from app.cli_eval import run_evaluate

    return run_evaluate(args, _settings())


def cmd_datasets(args: argparse.Namespace) -> int:
    from app.cli_datasets import DatasetCliError, run_datasets

    try:
        return run_datasets(args, _settings())
    except DatasetCliError as exc:
        raise CliError(str(exc)) from exc


def cmd_feedback(args: argparse.Namespace) -> int:
    from app.cli_feedback import FeedbackCliError, run_feedback

    try:
        return run_feedback(args, _settings())
    except FeedbackCliError as exc:
        raise CliError(str(exc)) from exc


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from app.training import TrainCliError, run_train

    try:
        return run_train(args, argv, _settings())
    except TrainCliError as exc:
        raise CliError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from PIL import Image

    # Pillow's decompression-bomb warnings are errors here, not log lines.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    from model.checkpoint import CheckpointError
    from model.data import DatasetError
    from model.device import DeviceError
    from model.run import TrainingError

    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "calibrate":
            return cmd_calibrate(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "gc":
            return cmd_gc(args)
        if args.command == "datasets":
            return cmd_datasets(args)
        if args.command == "feedback":
            return cmd_feedback(args)
        return cmd_import_torchvision(args)
    except (CliError, CheckpointError, DatasetError, DeviceError, TrainingError) as exc:
        print(f"alexnet: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValidationError as exc:
        print(f"alexnet: error: {_first_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("alexnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
