"""What `alexnet train` and whoever runs it agree on, written once.

The admin job runner (app/jobs/), torchrun and a user's own script all start the same
`alexnet train` process; this module is the whole of the contract between them:

- the run folder's files (`STATE_FILE`... `LOG_FILE`),
- the exit codes (`EXIT_INTERRUPTED`: stopped by a signal with its state saved),
- the progress events, one JSON object per line of `EVENTS_FILE`, each a model below,
- a `TrainConfig` as `alexnet train` options (`config_argv`) and back
  (`add_config_options` + `config_given`): the CLI's options are built from the config's
  fields, so their names, choices, bounds and defaults are stated once, in model/config.py.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from model.config import TrainConfig

# ----------------------------------------------------------------------------- run folder

STATE_FILE: Final = "state.safetensors"  # resumable state (model/run_state.py)
BEST_FILE: Final = "best.safetensors"  # best epoch's weights, when the state holds others
PLOT_FILE: Final = "losses.png"
EVENTS_FILE: Final = "events.jsonl"  # progress events (admin jobs; --events-file)
LOG_FILE: Final = "train.log"  # an admin job's stdout and stderr
# The version a run wrote, recorded before any rank waits on another: a group restarted
# after a peer died during that write finishes with it instead of writing a second.
WRITTEN_FILE: Final = "version.json"

# ----------------------------------------------------------------------------- exit codes

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # one line on stderr says why
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 75  # EX_TEMPFAIL: stopped with its state saved; resume later

# ----------------------------------------------------------------------------- errors


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad resume state...)."""


class TrainingInterrupted(Exception):
    """A stop was requested; the resumable state has been written."""

    def __init__(self, run_dir: Path, epoch: int, step: int) -> None:
        super().__init__(f"interrupted at epoch {epoch + 1}, step {step}; state in {run_dir}")
        self.run_dir, self.epoch, self.step = run_dir, epoch, step


# ----------------------------------------------------------------------------- events


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)
    time: float = Field(default_factory=time.time)


class EpochRecord(BaseModel):
    """One finished epoch: a line of the run's history (and of a job's)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float  # the rate the epoch trained with
    grad_norm: float
    images_per_s: float
    epoch_time_s: float


class Start(_Event):
    type: Literal["start"] = "start"
    config: dict[str, Any]
    labels: list[str]
    split: dict[str, Any]
    skipped: list[str] = []
    device: dict[str, str]
    epochs: int
    steps_per_epoch: int
    resumed_from: tuple[int, int] | None = None  # (epoch, step) it continues at
    world: int = 1
    base: dict[str, Any] | None = None  # version, classes, reinitialised (a fine-tune)
    dataset_hash: str | None = None  # what the data was (model/data.py's DatasetBundle.hash)
    # A resumed run's finished epochs, from its state: what a reader of the events keeps
    # even where the stopped attempt died between saving an epoch and telling its end.
    history: list[EpochRecord] = []


class EpochStart(_Event):
    type: Literal["epoch_start"] = "epoch_start"
    epoch: int
    epochs: int
    lr: float


class Step(_Event):
    type: Literal["step"] = "step"
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float  # the epoch's mean so far
    images_per_s: float
    eta_s: float


class EpochEnd(EpochRecord, _Event):
    type: Literal["epoch_end"] = "epoch_end"
    epochs: int
    improved: bool
    early_stop: bool
    next_lr: float

    def record(self) -> dict[str, Any]:
        """The history line, with whether it improved on the best."""
        return {**EpochRecord.model_validate(self.model_dump()).model_dump(),
                "improved": self.improved}  # fmt: skip


class Finished(_Event):
    type: Literal["finished"] = "finished"
    version: str
    metrics: dict[str, Any]
    stopped_early: bool


class Failed(_Event):
    type: Literal["failed"] = "failed"
    error: str


class Tracking(_Event):
    """News from a tracker (model/tracking.py): its run is on record, or it failed and
    training goes on without it."""

    type: Literal["tracking"] = "tracking"
    backend: Literal["mlflow", "tensorboard"]
    status: Literal["ok", "failed"]
    detail: dict[str, Any] = {}  # mlflow: uri, experiment_id, run_id; tensorboard: logdir
    error: str | None = None


class Interrupted(_Event):
    type: Literal["interrupted"] = "interrupted"
    epoch: int
    step: int
    run_dir: str


Event = Annotated[
    Start | EpochStart | Step | EpochEnd | Finished | Failed | Interrupted | Tracking,
    Field(discriminator="type"),
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str | bytes) -> Event | None:
    """One line of an events file; None for a line that is not a known event (a newer
    trainer's, or one cut short)."""
    try:
        return _EVENT.validate_json(line)
    except ValidationError:
        return None


def event_line(ev: Event) -> str:
    """One line of an events file: `type` and `time` first, then the fields, with
    json.dumps' spacing (as the file always had)."""
    fields = ev.model_dump(mode="json")
    return json.dumps({"type": fields.pop("type"), "time": fields.pop("time"), **fields}) + "\n"


# ----------------------------------------------------------------------------- command line


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


_NNODES: Final = re.compile(r"^([1-9][0-9]*)(?::([1-9][0-9]*))?$")


def launch_problem(nnodes: str, max_restarts: int, rdzv_endpoint: str | None, *,
                   name: typing.Callable[[str], str] = str) -> tuple[str, str] | None:  # fmt: skip
    """What is wrong with a torchrun launch, as (the option at fault, why), or None: the
    one rule `alexnet train` and POST /admin/jobs both refuse by. `name` spells an option
    in the message (`option` for the command line)."""
    m = _NNODES.match(nnodes)
    if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
        return "nnodes", f"{name('nnodes')} {nnodes}: give N or MIN:MAX (MIN <= MAX)"
    if max_restarts < 0:
        return "max_restarts", f"{name('max_restarts')} must be 0 or more, got {max_restarts}"
    if nnodes != "1" and rdzv_endpoint is None:
        return "rdzv_endpoint", (f"{name('nnodes')} {nnodes} needs {name('rdzv_endpoint')} "
                                 "HOST:PORT, where the nodes meet")  # fmt: skip
    return None


def config_argv(config: Mapping[str, Any]) -> list[str]:
    """`alexnet train` options for a config (a `TrainConfig`'s JSON dump): what the admin
    job runner starts. `add_config_options` parses them back to the same config."""
    args: list[str] = []
    for name, value in config.items():
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(option(name) if value else "--no-" + name.replace("_", "-"))
        else:
            args += [option(name), str(value)]
    return args


def _help(name: str) -> str:
    field = TrainConfig.model_fields[name]
    text = field.description or name.replace("_", " ")
    if field.is_required():
        return text
    if field.default is None:  # (its description says what None means)
        return text
    return f"{text} (default {field.default})"


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per `TrainConfig` field, default None: only options given reach the
    config, whose own defaults (shared with the admin API) then apply."""
    for name, field in TrainConfig.model_fields.items():
        kind: Any = field.annotation
        members: tuple[Any, ...] = (
            typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
        )
        inner: Any = next((a for a in members if a is not type(None)), kind)
        opt = option(name)
        if typing.get_origin(inner) is Literal:
            p.add_argument(opt, choices=list(typing.get_args(inner)), help=_help(name))
        elif inner is bool:
            p.add_argument(opt, action=argparse.BooleanOptionalAction, default=None,
                           help=_help(name))  # fmt: skip
        elif inner in (int, float, str):
            p.add_argument(opt, type=inner, help=_help(name),
                           metavar="VERSION" if name == "base" else None)  # fmt: skip
        else:  # a new field of a new kind must say how it is spelt on the command line
            raise TypeError(f"TrainConfig.{name}: no command-line form for {kind}")


def config_given(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line."""
    return {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
