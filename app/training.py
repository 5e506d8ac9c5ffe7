"""`alexnet train`: options -> TrainConfig, torchrun launch, signals, progress output."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any

from app.jobs.child import set_parent_death_signal
from app.settings import Settings
from model import run_state, tracking
from model.config import TrainConfig
from model.distributed import DistContext
from model.fine_tune import fine_tune_text
from model.run import (
    EXIT_INTERRUPTED,
    STATE_FILE,
    EpochEnd,
    Event,
    Start,
    Step,
    Tracking,
    TrainingInterrupted,
    config_given,
    event_line,
    launch_problem,
    option,
)
from model.run_state import RunState, RunStateError
from model.trainer import Trainer

# Options that may change when a run is resumed; the rest would change its meaning.
_RESUMABLE_OVERRIDES = {"epochs", "device", "precision", "workers", "patience",
                        "checkpoint_every_steps"}  # fmt: skip


class TrainCliError(Exception):
    pass


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{os.getpid()}"


class ProgressPrinter:
    """Renders trainer events: a progress bar on stderr (when a terminal, else nothing),
    one line per epoch on stdout."""

    def __init__(self, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> None:
        self.out, self.err = out, err
        self.tty = err.isatty()

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, Start):
            d = ev.device
            self.out.write(
                f"training {ev.config['arch']} on {ev.config['dataset']} "
                f"({ev.split['train']} train / {ev.split['val']} val images, "
                f"{len(ev.labels)} classes) on {d['device']} {d['precision']}"
                + (f", {ev.world} processes" if ev.world > 1 else "")
                + (
                    f", resumed at epoch {ev.resumed_from[0]} step {ev.resumed_from[1]}"
                    if ev.resumed_from
                    else ""
                )
                + "\n"
            )
            if ev.base:
                self.out.write(fine_tune_text(ev.base, len(ev.labels)) + "\n")
            for s in ev.skipped:
                self.err.write(f"warning: skipped unreadable image {s}\n")
        elif isinstance(ev, Step) and self.tty:
            width = 30
            done = int(width * ev.step / ev.steps)
            eta = time.strftime("%H:%M:%S", time.gmtime(ev.eta_s))
            self.err.write(
                f"\repoch {ev.epoch}/{ev.epochs} [{'#' * done}{'.' * (width - done)}] "
                f"{ev.step}/{ev.steps} loss {ev.loss:.4f} "
                f"{ev.images_per_s:.0f} img/s eta {eta} "
            )
            self.err.flush()
        elif isinstance(ev, EpochEnd):
            if self.tty:
                self.err.write("\r\033[K")
            self.out.write(
                f"epoch {ev.epoch:>3}/{ev.epochs}  train_loss {ev.train_loss:.4f}  "
                f"val_loss {ev.val_loss:.4f}  val_top1 {ev.val_top1:.2%}  "
                f"val_top5 {ev.val_top5:.2%}  lr {ev.lr:.2g}  "
                f"{ev.images_per_s:.0f} img/s" + ("  *" if ev.improved else "") + "\n"
            )
            if ev.early_stop:
                self.out.write("early stopping: validation loss stopped improving\n")
        elif isinstance(ev, Tracking):
            if ev.status == "failed":
                self.err.write(f"warning: {ev.backend} tracking failed, training goes on "
                               f"without it: {ev.error}\n")  # fmt: skip
            elif ev.backend == "mlflow":
                self.out.write(f"mlflow: run {ev.detail.get('run_id')} in experiment "
                               f"{ev.detail.get('experiment_id')} at {ev.detail.get('uri')}\n")  # fmt: skip
            else:
                self.out.write(f"tensorboard: event files in {ev.detail.get('logdir')}\n")
        self.out.flush()


class EventsFile:
    """Appends each event as one JSON line, flushed (admin jobs tail this file)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", buffering=1)

    def __call__(self, ev: Event) -> None:
        self.f.write(event_line(ev))
        self.f.flush()


@dataclass(frozen=True)
class Launch:
    """How torchrun starts the ranks: `nnodes` ("N" or "MIN:MAX": elastic), how many times
    it restarts them all after a worker dies, and the c10d rendezvous several nodes meet at
    (None: this node alone, torchrun's --standalone)."""

    nnodes: str = "1"
    max_restarts: int = 0
    rdzv_endpoint: str | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> Launch:
        launch = cls(args.nnodes, args.max_restarts, args.rdzv_endpoint)
        problem = launch_problem(launch.nnodes, launch.max_restarts, launch.rdzv_endpoint,
                                 name=option)  # fmt: skip
        if problem is not None:
            raise TrainCliError(problem[1])
        return launch

    def distributed(self, nproc: int) -> bool:
        return nproc > 1 or self.nnodes != "1" or self.max_restarts > 0 or bool(self.rdzv_endpoint)

    def torchrun_options(self, run_dir: Path) -> list[str]:
        if self.rdzv_endpoint is None:
            where = ["--standalone"]
        else:  # the run folder's name is the rendezvous id: the same on every node
            where = ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
                     f"--rdzv-id={run_dir.name}"]  # fmt: skip
        return [*where, f"--nnodes={self.nnodes}", f"--max-restarts={self.max_restarts}"]


def torchrun_argv(argv: Sequence[str], run_dir: Path, base: str | None = None) -> list[str]:
    """The ranks' `alexnet train` options: this command's, without the launcher's own
    (--nproc-per-node, --nnodes, ...), with the run folder, told to resume from the run
    folder's state when there is one (a torchrun restart after a worker died), and with
    the base version as this process resolved it (`--base active`, or the older `--resume
    VERSION`, resolved once: ACTIVE may change meanwhile, and every rank must start from
    the same weights)."""
    drop = {"--nproc-per-node", "--nnodes", "--max-restarts", "--rdzv-endpoint"} | (
        {"--base", "--resume"} if base is not None else set()
    )
    rest: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if any(a.startswith(d + "=") for d in drop):
            continue
        rest.append(a)
    if "--run-dir" not in rest and not any(a.startswith("--run-dir=") for a in rest):
        rest += ["--run-dir", str(run_dir)]
    if base is not None:
        rest += ["--base", base]
    return [*rest, "--resume-if-saved"]


def launch_torchrun(argv: Sequence[str], nproc: int, run_dir: Path, base: str | None = None,
                    launch: Launch | None = None) -> int:  # fmt: skip
    """Re-run this command under torchrun with `nproc` processes on this node."""
    rest = torchrun_argv(argv, run_dir, base)
    cmd = [sys.executable, "-m", "torch.distributed.run",
           *(launch or Launch()).torchrun_options(run_dir),
           f"--nproc-per-node={nproc}", "-m", "app.cli", *rest]  # fmt: skip
    # Each rendezvous round's rank 0 hosts a store of its own (on a free port), instead of
    # every round sharing the rendezvous store: what a dead group's ranks wrote in a shared
    # one (their addresses) would be read by the next group and hang it, and a node that
    # replaces a dead one counts its restarts from 0, so no per-node count can keep the
    # rounds' keys apart (`_dist_context`).
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(cmd, env=env)

    asked: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        asked.append(signum)
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = proc.wait()
    # Asked to stop, the ranks save and exit EXIT_INTERRUPTED, which torchrun reports as
    # its own failure (1): the state tells. A failure nobody asked for stays a failure
    # (a rank that crashed once its restarts were spent, say).
    if rc != 0 and asked and _interrupted_state(run_dir):
        return EXIT_INTERRUPTED
    return rc


def _interrupted_state(run_dir: Path) -> bool:
    try:
        return not RunState.read(run_dir).finished
    except RunStateError:
        return False


def _dist_context() -> DistContext | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Rank 0 alone makes the new version's extras (a pass over val and the holdout:
    # model/extras.py) while the others wait in a collective: more than the default
    # 10-minute watchdog on a large dataset.
    timeout = timedelta(hours=2)
    if "MASTER_ADDR" not in os.environ:  # not torchrun's environment: as the launcher says
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        rank = int(os.environ["RANK"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        # Our launcher's torchrun (`launch_torchrun`): each round's rank 0 hosts a fresh
        # store, so nothing a dead group wrote is read by the next one. A torchrun started
        # by hand shares its rendezvous store with every round: what the dead group's
        # ranks wrote in it (their addresses) would be read by the new one and hang it in
        # gloo's connectFullMesh, so each attempt gets keys of its own. (A node that
        # replaces a dead one counts its attempts from 0 and cannot meet the others that
        # way: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as our launcher does.)
        store = dist.TCPStore(  # type: ignore[attr-defined]
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
            is_master=rank == 0 and not agent, timeout=timedelta(minutes=10),
            multi_tenant=not agent,
        )  # fmt: skip
        if agent:
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"alexnet/attempt_{restart}", store)  # type: ignore[attr-defined,assignment]
        dist.init_process_group(backend=backend, timeout=timeout, rank=rank, world_size=world,
                                store=store)  # fmt: skip
    return DistContext(
        rank=dist.get_rank(), world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )  # fmt: skip


def run_train(args: argparse.Namespace, argv: Sequence[str], s: Settings) -> int:
    from model.checkpoint import (
        CheckpointError,
        read_active,
        resolve_version_dir,
        write_active,
    )
    from model.files import set_writer_tag

    set_parent_death_signal()  # a job's child must not outlive the service
    if args.writer_tag:
        set_writer_tag(args.writer_tag)
    given = config_given(args)
    resume_run: Path | None = None
    if args.resume:
        candidate = Path(args.resume)
        if candidate.is_file() and candidate.name == STATE_FILE:
            candidate = candidate.parent
        if run_state.exists(candidate):
            resume_run = candidate
        elif "base" in given:
            raise TrainCliError("--resume VERSION is --base VERSION: give one of them")
        else:  # `--resume VERSION`: the older spelling of --base
            try:
                resolve_version_dir(s.models_dir, args.resume)
            except CheckpointError as exc:
                raise TrainCliError(
                    f"--resume {args.resume}: neither a run folder with {STATE_FILE} "
                    "nor a model version"
                ) from exc
            given["base"] = args.resume
    if (resume_run is None and args.resume_if_saved and args.run_dir is not None
            and run_state.exists(args.run_dir)):  # fmt: skip
        resume_run = args.run_dir  # torchrun restarted the ranks: on from the last save
    if "base" in given and resume_run is None:
        given.update(fine_tune_defaults(s.models_dir, given["base"], given))
    if resume_run is not None:
        base = Trainer.read_config(resume_run).model_dump()
        changed = {k for k, v in given.items() if k not in _RESUMABLE_OVERRIDES and base[k] != v}
        if changed:
            raise TrainCliError(
                f"cannot change {', '.join(sorted(changed))} when resuming {resume_run}"
            )
        cfg = TrainConfig.model_validate({**base, **given})
        run_dir = resume_run
    else:
        if "dataset" not in given:
            raise TrainCliError("--dataset is required (cifar10, synthetic, imagefolder:NAME)")
        cfg = TrainConfig.model_validate(given)
        run_dir = args.run_dir or _default_run_dir(s)

    if args.nproc_per_node < 1:
        raise TrainCliError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    launch = Launch.of(args)
    if launch.distributed(args.nproc_per_node) and "WORLD_SIZE" not in os.environ:
        if launch.rdzv_endpoint is not None and args.run_dir is None and resume_run is None:
            raise TrainCliError("--rdzv-endpoint needs --run-dir: a folder every node shares, "
                                "where the ranks save and resume the run")  # fmt: skip
        if (launch.rdzv_endpoint is None and resume_run is None
                and run_state.exists(run_dir)):  # fmt: skip
            raise TrainCliError(f"{run_dir} already holds a run's state: --resume {run_dir}, "
                                "or give another --run-dir")  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = given.get("base") if resume_run is None else None
        return launch_torchrun(argv, args.nproc_per_node, run_dir, resolved, launch)

    dist_ctx = _dist_context()
    callbacks: list[Any] = [ProgressPrinter()]
    if args.events_file:
        callbacks.append(EventsFile(args.events_file))

    # Rank 0 alone tracks (the others' events are not emitted).
    tracked = tracking.trackers(
        run_dir=run_dir, models_dir=s.models_dir,
        mlflow_uri=args.mlflow_uri or s.mlflow_tracking_uri,
        mlflow_experiment=args.mlflow_experiment or s.mlflow_experiment,
        tensorboard=s.tensorboard if args.tensorboard is None else args.tensorboard,
        job_id=args.writer_tag.removeprefix("job-") if args.writer_tag else None,
        mlflow_timeout_s=s.mlflow_timeout_s,
    ) if dist_ctx is None or dist_ctx.rank == 0 else []  # fmt: skip

    def callback(ev: Event) -> None:
        # A tracker's news (its run on record, or that it failed) goes first: a job's
        # record has it by the time it reads the run's end.
        news: list[Event] = [n for t in tracked for n in t.handle(ev)]
        for e in (*news, ev):
            for cb in callbacks:
                cb(e)

    trainer = Trainer(
        cfg, data_dir=s.data_dir, models_dir=s.models_dir, run_dir=run_dir,
        callback=callback, dist_ctx=dist_ctx, holdout_share=s.holdout_split, hooks=tracked,
    )  # fmt: skip

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Finish the step, save, exit EXIT_INTERRUPTED; a second Ctrl-C falls through.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        trainer.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        result = trainer.fit(resume=resume_run is not None)
    except TrainingInterrupted as exc:
        if trainer.dist.is_main:
            print(f"interrupted; state saved. Continue with: alexnet train --resume {exc.run_dir}",
                  file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    finally:
        if dist_ctx is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not trainer.dist.is_main:
        return 0
    card = result.card
    activated = not args.keep_active and (args.activate or read_active(s.models_dir) is None)
    if activated:
        write_active(s.models_dir, card.version)
    m = card.metrics
    print(
        f"saved version {card.version}: val_top1 {m['val_top1']:.2%}, val_top5 "
        f"{m['val_top5']:.2%}, val_loss {m['val_loss']:.4f} (best of {m['epochs_run']} epochs)"
        + (" - now active" if activated else "")
    )
    return 0


def fine_tune_defaults(models_dir: Path, base: str, given: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning options taken from the base version (`ModelCard.fine_tune_defaults`):
    `active` resolved, so the run records what it really started from."""
    from model.checkpoint import CheckpointError, read_card, resolve_version_dir

    try:
        path = resolve_version_dir(models_dir, base)
        card = read_card(path)
    except CheckpointError as exc:
        raise TrainCliError(f"--base {base}: {exc}") from exc
    if path.resolve().parent != models_dir.resolve():
        raise TrainCliError(
            f"--base {base}: a version outside {models_dir}; copy it into the model store first"
        )
    return card.fine_tune_defaults(given)


def _default_run_dir(s: Settings) -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") if "WORLD_SIZE" in os.environ else None
    return s.runs_dir / (run_id or new_run_id())
