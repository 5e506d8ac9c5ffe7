"""A run's resumable state, `state.safetensors` in its run folder: the one reader and
writer of that file.

One safetensors file: the tensors (weights as `model.*`, momentum buffers as `optim.N.*`,
every rank's RNG as `rng.torch.R`, the CUDA RNG) and, as JSON metadata under "state",
everything else needed to continue exactly: the config, the position (epoch, step), the
epoch's running sums, the scheduler and early stopping, the best epoch, the history, the
dataset split and preprocessing, the lineage, and the version a finished run became.
Written atomically (a crash leaves the previous state); read with no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from model.checkpoint import check_state_dict
from model.config import TrainConfig
from model.files import atomic_write_bytes
from model.run import BEST_FILE, STATE_FILE, TrainingError
from model.transforms import Preprocessing


class RunStateError(TrainingError):
    """No readable resumable state where one was expected."""


def state_path(run_dir: Path) -> Path:
    return run_dir / STATE_FILE


def exists(run_dir: Path) -> bool:
    return state_path(run_dir).is_file()


@dataclass(frozen=True)
class RunState:
    """What the state file says, without its tensors: "which config, which epoch,
    finished or not"."""

    run_dir: Path
    meta: dict[str, Any]

    @classmethod
    def read(cls, run_dir: Path) -> RunState:
        path = state_path(run_dir)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
        except Exception as exc:
            raise RunStateError(f"{path}: not a resumable run state ({exc})") from exc
        return cls(run_dir, meta)

    @classmethod
    def load(cls, run_dir: Path) -> tuple[RunState, dict[str, torch.Tensor]]:
        """The state and its tensors (to continue the run)."""
        path = state_path(run_dir)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise RunStateError(f"{path}: unreadable resumable state ({exc})") from exc
        return cls(run_dir, meta), tensors

    @staticmethod
    def save(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            state_path(run_dir), st_save(tensors, metadata={"state": json.dumps(meta)})
        )

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.meta["config"])

    @property
    def epoch(self) -> int:
        """Epochs finished (the next one to run, from 0)."""
        return int(self.meta["epoch"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def finished_version(self) -> str | None:
        """The version this run became; None while it can go on."""
        v = self.meta.get("finished_version")
        return str(v) if v else None

    @property
    def finished(self) -> bool:
        return self.finished_version is not None

    @property
    def preprocessing(self) -> Preprocessing | None:
        """How the run preprocesses (None in states written before it was saved)."""
        saved = self.meta["dataset"].get("pre")
        if saved is None:
            return None
        return Preprocessing(**{**saved, "mean": tuple(saved["mean"]), "std": tuple(saved["std"])})


def read_best_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """best.safetensors: the best epoch's weights, kept when the state holds a later one's."""
    with safe_open(str(run_dir / BEST_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def write_best_weights(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(run_dir / BEST_FILE, st_save(weights))


# ----------------------------------------------------------------------------- tensors


def training_tensors(net: nn.Module, optimizer: torch.optim.Optimizer,
                     rngs: list[torch.Tensor]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The state file's tensors: weights, momentum buffers, every rank's RNG (`rngs`, in
    rank order) and the CUDA RNG when the model is on CUDA."""
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous()
               for k, v in net.state_dict().items()}  # fmt: skip
    for idx, s in optimizer.state_dict()["state"].items():
        if s.get("momentum_buffer") is not None:
            tensors[f"optim.{idx}.momentum_buffer"] = (
                s["momentum_buffer"].detach().cpu().contiguous()
            )
    for r, t in enumerate(rngs):
        tensors[f"rng.torch.{r}"] = t.cpu()
    if torch.cuda.is_available() and next(net.parameters()).device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def restore_training(tensors: dict[str, torch.Tensor], net: nn.Module,
                     optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]], *,
                     rank: int, source: str) -> None:  # fmt: skip
    """Put a state file's tensors back: weights (checked against `net`), momentum buffers,
    this rank's RNG and the CUDA RNG."""
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    check_state_dict(net, weights, source=source)
    net.load_state_dict(weights)
    # The optimizer numbers its state across all groups (a fine-tune has two: new layers and
    # kept ones at a scaled rate).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            idx = int(k.split(".")[1])
            # Same strides as the parameter: the fused SGD kernel walks param, grad and
            # buffer as flat memory, so a contiguous buffer beside a channels_last weight
            # would be applied to the wrong elements.
            opt_state[idx] = {"momentum_buffer": torch.empty_like(params[idx]).copy_(v)}
    optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    rng = tensors.get(f"rng.torch.{rank}", tensors.get("rng.torch.0"))
    if rng is not None:
        torch.set_rng_state(rng)
    if "rng.cuda" in tensors and next(net.parameters()).device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
