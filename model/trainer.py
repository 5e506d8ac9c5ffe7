"""The training engine behind `alexnet train`, torchrun and admin jobs.

The seed article's Trainer made real: SGD with the paper's defaults, the LR policies and
early stopping of model/schedules.py, mixed precision, channels_last, a resumable state
written atomically every epoch and on SIGTERM (model/run_state.py), the best epoch saved as
a model version, and the progress events of model/run.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from model.checkpoint import (
    CheckpointError,
    ModelCard,
    read_card,
    resolve_version_dir,
)
from model.config import TrainConfig
from model.data import (
    DatasetBundle,
    TrainAugment,
    batches,
    default_workers,
    load_dataset,
    run_loaders,
    with_feedback,
)
from model.datasets import DEFAULT_HOLDOUT_SPLIT
from model.device import DTYPES, Placement, resolve
from model.distributed import DistContext
from model.ema import WeightEMA
from model.engine import Classifier, evaluate, sgd_step
from model.epochs import Best, EpochAcc, TrainResult, eta_s, save_best, to_cpu
from model.files import RunFolderBusy, atomic_write_bytes, run_lock
from model.fine_tune import (
    base_card,
    base_preprocessing,
    fine_tune_text,
    head_names,
    load_base_weights,
    param_groups,
)
from model.network import build_model
from model.plots import loss_plot_png
from model.run import (
    PLOT_FILE,
    WRITTEN_FILE,
    EpochEnd,
    EpochStart,
    Event,
    Failed,
    Finished,
    Interrupted,
    Start,
    Step,
    TrainingError,
    TrainingInterrupted,
)
from model.run_state import (
    RunState,
    read_best_weights,
    restore_training,
    training_tensors,
)
from model.schedules import EarlyStopping, LRPolicy
from model.tracking import SAMPLE_IMAGES, TrainHooks
from model.transforms import EvalTransform

log = logging.getLogger(__name__)

EVENT_INTERVAL_S: Final = 0.5

Callback = Callable[[Event], None]


class Trainer:
    """Train `cfg` and register the best epoch as a model version.

    `run_dir` holds the resumable state, the best weights and the loss plot. Only rank 0
    writes files and emits events; every rank takes the same decisions from all-reduced
    validation metrics, so they all leave together.
    """

    def __init__(self, cfg: TrainConfig, *, data_dir: Path, models_dir: Path, run_dir: Path,
                 callback: Callback | None = None, dist_ctx: DistContext | None = None,
                 holdout_share: float = DEFAULT_HOLDOUT_SPLIT,
                 hooks: Sequence[TrainHooks] = ()) -> None:  # fmt: skip
        self.cfg, self.data_dir, self.models_dir, self.run_dir = cfg, data_dir, models_dir, run_dir
        # An imagefolder made by hand has its holdout drawn at first use: this share of it.
        self.holdout_share = holdout_share
        self.callback = callback
        # Per-step and per-validation calls on rank 0 (model/tracking.py: TensorBoard).
        self.hooks = list(hooks)
        self.dist = dist_ctx or DistContext()
        # Lineage: the version whose weights this run started from; None from scratch.
        self.parent = cfg.base
        self._stop = False
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.best = Best()
        self.base_info: dict[str, Any] | None = None  # what was taken from the base

    def request_stop(self) -> None:
        """Finish the current step, save the resumable state, raise TrainingInterrupted.
        Safe to call from a signal handler."""
        self._stop = True

    def emit(self, ev: Event) -> None:
        if self.callback is not None and self.dist.is_main:
            self.callback(ev)

    @staticmethod
    def read_config(run_dir: Path) -> TrainConfig:
        """The config a run was started with (for `--resume PATH`)."""
        return RunState.read(run_dir).config

    # ------------------------------------------------------------------ the run

    def fit(self, *, resume: bool = False) -> TrainResult:
        try:
            with self._exclusive():
                return self._fit(resume)
        except TrainingInterrupted as exc:
            self.emit(Interrupted(epoch=exc.epoch + 1, step=exc.step, run_dir=str(exc.run_dir)))
            raise
        except Exception as exc:
            kind = "TrainingError" if isinstance(exc, TrainingError) else type(exc).__name__
            self.emit(Failed(error=f"{kind}: {exc}"))
            raise

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Rank 0 holds the run folder's lock while it trains (see `run_lock`)."""
        with contextlib.ExitStack() as stack:
            if self.dist.is_main:
                try:
                    stack.enter_context(run_lock(self.run_dir))
                except RunFolderBusy as exc:
                    raise TrainingError(str(exc)) from exc
            yield

    def _fit(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        placement = self.dist.place(resolve(cfg.device, cfg.precision))
        # A resumed run preprocesses as it started, without needing its base version any
        # more (states written before that was saved fall back to the base's).
        saved = RunState.read(self.run_dir) if resume else None
        pre = saved.preprocessing if saved is not None else None
        base = (
            base_card(self.models_dir, cfg.base, cfg.arch)
            if cfg.base is not None and pre is None
            else None
        )
        if base is not None:
            pre = base_preprocessing(base, cfg.image_size)
        bundle = load_dataset(cfg.dataset, data_dir=self.data_dir, image_size=cfg.image_size,
                              val_split=cfg.val_split, seed=cfg.seed, pre=pre,
                              holdout_share=self.holdout_share)  # fmt: skip
        if cfg.feedback is not None:
            bundle = with_feedback(bundle, load_dataset(
                cfg.feedback, data_dir=self.data_dir, image_size=cfg.image_size,
                val_split=cfg.val_split, seed=cfg.seed, pre=bundle.pre,
                holdout_share=self.holdout_share))  # fmt: skip
        model, base_info = self._build(bundle, placement, base if saved is None else None)
        if base_info is not None:
            self.base_info = base_info
        elif saved is not None:
            self.base_info = saved.meta.get("base")
        # Frozen layers are left out; kept ones may learn slower (model/fine_tune.py).
        groups = param_groups(model.net, lr=cfg.lr, freeze=cfg.freeze,
                              base_lr_scale=cfg.base_lr_scale,
                              reinitialised=self._reinitialised(model.net, base_info, saved))  # fmt: skip
        # fused: one kernel for all 57M parameters, 5x faster than foreach on CPU
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, fused=True)  # fmt: skip
        # DDP after freezing: its reducer expects a gradient for every parameter that
        # requires one when it is built.
        train_model: nn.Module = model
        if self.dist.world > 1:
            ids = [placement.device.index] if placement.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        policy = LRPolicy(optimizer, cfg.scheduler)
        early = EarlyStopping(cfg.patience, cfg.min_delta)
        # The weights' moving average, of the unwrapped network (DDP shares its parameters).
        ema = WeightEMA(model.net, cfg.ema_decay) if cfg.ema_decay is not None else None
        # What is validated, kept as the best epoch and saved: the average where there is one.
        eval_model = (Classifier(ema.net, bundle.pre, channels_last=True).to(placement.device)
                      if ema else model)  # fmt: skip
        start_epoch, start_step, acc, world_changed = 0, 0, EpochAcc(), False
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            start_epoch, start_step, acc, world_changed = self._load_state(
                model, optimizer, policy, early, bundle, ema)  # fmt: skip

        amp_dtype = None if placement.precision == "fp32" else DTYPES[placement.precision]
        scaler = torch.amp.GradScaler("cuda") if placement.precision == "fp16" else None
        d = self.dist
        workers = cfg.workers if cfg.workers is not None else default_workers()
        loaders = run_loaders(bundle, batch_size=cfg.batch_size, seed=cfg.seed, rank=d.rank,
                              world=d.world, pin_memory=placement.device.type == "cuda",
                              workers=workers)  # fmt: skip
        train_sampler, steps_per_epoch = loaders.train_sampler, loaders.steps_per_epoch
        augment = TrainAugment(bundle.pre) if cfg.use_augmentation else None
        eval_tf = EvalTransform(bundle.pre)
        policy.configure(steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs)
        if world_changed:  # the schedule goes on from the epoch's start, in this world's steps
            policy.rewind(start_epoch * steps_per_epoch)
        self.emit(Start(config=cfg.model_dump(mode="json"), labels=bundle.labels,
                        split=bundle.split, skipped=bundle.skipped, device=placement.describe(),
                        epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                        resumed_from=(start_epoch + 1, start_step) if resume else None,
                        world=d.world, base=base_info, dataset_hash=bundle.hash,
                        history=self.history if resume else []))  # fmt: skip
        if base_info is not None:
            log.info("%s", fine_tune_text(base_info, len(bundle.labels)))
        log.info("training %s on %s (%s), %s", cfg.arch, cfg.dataset, placement.describe(),
                 bundle.split)  # fmt: skip

        def save(epoch: int, step: int, acc: EpochAcc, finished: str | None = None) -> None:
            self._save_state(model, optimizer, policy, early, epoch=epoch, step=step, acc=acc,
                             bundle=bundle, finished=finished, ema=ema)  # fmt: skip

        val_seconds = 0.0
        epoch = start_epoch
        for epoch in range(start_epoch, cfg.epochs):
            if early.early_stop:
                break
            # 1. train one epoch (from where a resumed run stopped)
            first_step = start_step if epoch == start_epoch else 0
            if first_step == 0:
                acc = EpochAcc()
            train_sampler.set_epoch(epoch, first_step * cfg.batch_size)
            self.emit(EpochStart(epoch=epoch + 1, epochs=cfg.epochs, lr=policy.lr))
            train_model.train()
            last_emit = 0.0
            t_epoch = time.perf_counter()
            for step, (x, y) in enumerate(batches(loaders.train), start=first_step):
                t0 = time.perf_counter()
                x = x.to(placement.device, non_blocking=True)
                y = y.to(placement.device, non_blocking=True)
                if augment is not None:
                    seed = (cfg.seed * 1_000_003 + epoch) * 100_003 + step
                    x = augment(x, torch.Generator().manual_seed(seed))
                else:
                    x = eval_tf(x)
                loss, gnorm = sgd_step(train_model, model, optimizer, scaler, x, y, amp_dtype,
                                       label_smoothing=cfg.label_smoothing,
                                       clip_grad_norm=cfg.clip_grad_norm)  # fmt: skip
                if ema is not None:
                    ema.update()
                lr_step = policy.lr
                policy.batch_step()
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
                        f"try a lower --lr (now {policy.lr:g}) or --precision fp32"
                    )
                acc.loss_sum += loss
                acc.grad_norm_sum += gnorm
                acc.steps += 1
                acc.images += int(y.numel()) * d.world
                acc.seconds += time.perf_counter() - t0
                self.step_losses.append(loss)
                if self.hooks and d.is_main:
                    for h in self.hooks:
                        h.step(epoch * steps_per_epoch + step + 1, loss, lr_step)
                now = time.perf_counter()
                if now - last_emit >= EVENT_INTERVAL_S or step + 1 == steps_per_epoch:
                    last_emit = now
                    eta = eta_s(acc.images_per_s, epoch=epoch, step=step + 1,
                                steps=steps_per_epoch, epochs=cfg.epochs, batch=cfg.batch_size,
                                world=d.world, val_seconds=val_seconds)  # fmt: skip
                    self.emit(Step(epoch=epoch + 1, epochs=cfg.epochs, step=step + 1,
                                   steps=steps_per_epoch, loss=acc.loss_sum / acc.steps,
                                   images_per_s=acc.images_per_s, eta_s=eta))  # fmt: skip
                every = cfg.checkpoint_every_steps
                if every and (step + 1) % every == 0 and step + 1 < steps_per_epoch:
                    self.best.persist(self.run_dir, d.is_main)  # (the state's weights move on)
                    save(epoch, step + 1, acc)
                if d.agree_to_stop(self._stop):
                    self.best.persist(self.run_dir, d.is_main)
                    save(epoch, step + 1, acc)
                    d.barrier()
                    raise TrainingInterrupted(self.run_dir, epoch, step + 1)
            train_time = time.perf_counter() - t_epoch

            # 2. validate
            t_val = time.perf_counter()
            val = d.sum_eval(evaluate(eval_model, ((eval_tf(x.to(placement.device, non_blocking=True)), y)
                                         for x, y in batches(loaders.val)), autocast_dtype=amp_dtype),
                             placement.device)  # fmt: skip
            val_seconds = time.perf_counter() - t_val
            log.info("validated rank %d epoch %d: loss %.6f top1 %.6f top5 %.6f n %d",
                     d.rank, epoch + 1, val.loss, val.top1, val.top5, val.count)  # fmt: skip
            if d.is_main and any(h.wants_samples for h in self.hooks):
                self._samples(epoch + 1, eval_model, bundle, eval_tf, amp_dtype)
            lr_used = policy.lr
            policy.step(val.loss, val.top1)
            improved = early(val.loss)
            record = {"epoch": epoch + 1, "train_loss": acc.loss_sum / max(acc.steps, 1),
                      "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5,
                      "lr": lr_used, "grad_norm": acc.grad_norm_sum / max(acc.steps, 1),
                      "images_per_s": acc.images_per_s,
                      "epoch_time_s": train_time + val_seconds}  # fmt: skip
            self.history.append(record)

            # 3. keep the best weights, save the state and the plot
            if improved:
                self.best.improved(record, eval_model.net)
            else:
                self.best.persist(self.run_dir, d.is_main)
            save(epoch + 1, 0, EpochAcc())
            self._write_plot(steps_per_epoch)
            self.emit(EpochEnd(**record, epochs=cfg.epochs, improved=improved,
                               early_stop=early.early_stop, next_lr=policy.lr))  # fmt: skip
            if d.agree_to_stop(self._stop):
                d.barrier()
                raise TrainingInterrupted(self.run_dir, epoch + 1, 0)

        # 4. register the best epoch as a model version
        best = self.best
        if best.record is None or best.weights is None:
            raise TrainingError("no epoch finished: nothing to save")
        card = None
        if d.is_main:
            written = {"epochs_run": len(self.history), "best_epoch": best.record["epoch"]}
            card = self._written_card(written) if resume else None
            if card is None:
                card = save_best(self.models_dir, cfg, bundle, best.weights, best.record,
                                 epochs_run=len(self.history), stopped_early=early.early_stop,
                                 parent=self.parent, device=placement.device, workers=workers)  # fmt: skip
                # Recorded before the collectives below: if a peer dies in them, the
                # restarted group finishes with this version instead of writing another.
                atomic_write_bytes(self.run_dir / WRITTEN_FILE,
                                   json.dumps({"version": card.version, **written}).encode())  # fmt: skip
        card = d.broadcast_card(card)
        if card is None:
            raise CheckpointError("no version was written")
        save(epoch + 1, 0, EpochAcc(), finished=card.version)
        d.barrier()
        self.emit(Finished(version=card.version, metrics=card.metrics,
                           stopped_early=early.early_stop))  # fmt: skip
        return TrainResult(card, self.history, int(best.record["epoch"]), early.early_stop)

    # ------------------------------------------------------------------ parts

    def _build(self, bundle: DatasetBundle, placement: Placement,
               base: ModelCard | None) -> tuple[Classifier, dict[str, Any] | None]:  # fmt: skip
        """The network; with `base`, its weights that fit (a resumed run's come from its
        state instead)."""
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        net = build_model(self.cfg.arch, num_classes=len(bundle.labels), init=self.cfg.init,
                          dropout=self.cfg.dropout)  # fmt: skip
        info = (None if base is None
                else load_base_weights(net, self.models_dir, base, bundle.labels))  # fmt: skip
        if info is not None:
            info["freeze"] = self.cfg.freeze
        net = net.to(placement.device).to(memory_format=torch.channels_last)
        return Classifier(net, bundle.pre, channels_last=True).to(placement.device), info

    def _written_card(self, now: dict[str, Any]) -> ModelCard | None:
        """The version an earlier attempt of this run wrote before its group stopped
        (`WRITTEN_FILE`), when it was written from the same epochs as `now` (a resume
        with more --epochs trains on: a new version) and is still in the model store."""
        path = self.run_dir / WRITTEN_FILE
        try:
            written = json.loads(path.read_text())
            if {k: written.get(k) for k in now} != now:
                return None
            card = read_card(resolve_version_dir(self.models_dir, str(written["version"])))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as exc:
            log.warning("%s: %s; the version is written again", path, exc)
            return None
        log.info("version %s was written before the group stopped: finishing with it",
                 card.version)  # fmt: skip
        return card

    def _reinitialised(self, net: nn.Module, base_info: dict[str, Any] | None,
                       saved: RunState | None) -> set[str]:  # fmt: skip
        """What learns at the full rate: every parameter from scratch, else what the base
        did not provide (a resumed run: as recorded when it started)."""
        if self.cfg.base is None:
            return {n for n, _ in net.named_parameters()}
        if base_info is not None:
            return set(base_info["reinitialised"])
        recorded = (saved.meta.get("base") or {}) if saved is not None else {}
        return set(recorded.get("reinitialised", head_names(net)))

    def _save_state(self, model: Classifier, optimizer: torch.optim.Optimizer,
                    policy: LRPolicy, early: EarlyStopping, *, epoch: int, step: int,
                    acc: EpochAcc, bundle: DatasetBundle, finished: str | None = None,
                    ema: WeightEMA | None = None) -> None:  # fmt: skip
        """Everything needed to continue exactly (model/run_state.py). Every rank's RNG
        state is gathered; rank 0 writes."""
        rngs = self.dist.gather_rng_states()
        if not self.dist.is_main:
            return
        tensors = training_tensors(model.net, optimizer, rngs)
        if ema is not None:
            tensors.update(ema.tensors())
        opt = optimizer.state_dict()
        meta = {
            "config": self.cfg.model_dump(mode="json"), "epoch": epoch, "step": step,
            "acc": acc.__dict__, "param_groups": opt["param_groups"],
            "scheduler": policy.state_dict(), "early_stopping": early.state_dict(),
            "best": self.best.record, "history": self.history, "step_losses": self.step_losses,
            "dataset": {"spec": bundle.spec, "labels": bundle.labels, "split": bundle.split,
                        "pre": bundle.pre.to_dict()},
            "parent": self.parent, "finished_version": finished, "base": self.base_info,
            "best_in_state": self.best.in_state, "world": self.dist.world,
        }  # fmt: skip
        RunState.save(self.run_dir, tensors, meta)

    def _load_state(self, model: Classifier, optimizer: torch.optim.Optimizer,
                    policy: LRPolicy, early: EarlyStopping,
                    bundle: DatasetBundle,
                    ema: WeightEMA | None = None) -> tuple[int, int, EpochAcc, bool]:  # fmt: skip
        """The epoch and step to go on from, the epoch's sums so far, and whether the
        world changed (the caller moves the schedule to the epoch's start once it knows
        this world's steps per epoch)."""
        state, tensors = RunState.load(self.run_dir)
        meta, path = state.meta, self.run_dir
        if meta["dataset"]["split"] != bundle.split or meta["dataset"]["labels"] != bundle.labels:
            raise TrainingError(f"{path}: the dataset changed since this run started")
        restore_training(tensors, model.net, optimizer, meta["param_groups"],
                         rank=self.dist.rank, source=str(path))  # fmt: skip
        if ema is not None and not ema.restore(tensors):  # (a state without one: from here)
            ema.net.load_state_dict(model.net.state_dict())
        policy.load_state_dict(meta["scheduler"])
        early.load_state_dict(meta["early_stopping"])
        self.history, self.step_losses = meta["history"], meta["step_losses"]
        if state.finished:
            raise TrainingError(
                f"{self.run_dir}: this run already finished as version {state.finished_version}"
            )
        in_state = bool(meta.get("best_in_state"))
        if meta["best"] is not None:
            net_now = ema.net if ema is not None else model.net  # what `best` was taken from
            weights_now = to_cpu(net_now.state_dict()) if in_state else None
            self.best = Best(meta["best"], weights_now or read_best_weights(self.run_dir),
                              in_state)  # fmt: skip
        saved_world = int(meta.get("world", 1))
        if saved_world != self.dist.world:
            # Another world shards the epoch differently: the steps done so far are not
            # "the first N" of the new shards. The epoch in progress starts over, from the
            # weights reached (an elastic restart with fewer or more workers), and its
            # steps' losses are dropped with it.
            if state.step:
                log.warning("%s: saved by %d processes, resumed by %d: epoch %d starts over "
                            "from the weights saved at its step %d", path, saved_world,
                            self.dist.world, state.epoch + 1, state.step)  # fmt: skip
                del self.step_losses[max(0, len(self.step_losses) - state.step) :]
            return state.epoch, 0, EpochAcc(), True
        return state.epoch, state.step, EpochAcc(**meta["acc"]), False

    def _samples(self, epoch: int, model: Classifier, bundle: DatasetBundle,
                 eval_tf: EvalTransform, amp_dtype: torch.dtype | None) -> None:  # fmt: skip
        """The first few validation images and the model's answers, for the hooks."""
        n = min(SAMPLE_IMAGES, len(bundle.val))
        if n == 0:
            return
        items = [bundle.val[i] for i in range(n)]
        images = torch.stack([torch.as_tensor(x) for x, _ in items])
        was_training = model.training
        model.eval()
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=amp_dtype or torch.bfloat16,
                                                    enabled=amp_dtype is not None):  # fmt: skip
            probs = torch.softmax(model(eval_tf(images.to(model.device))).float(), dim=1).cpu()
        model.train(was_training)
        conf, pred = probs.max(dim=1)
        labels = bundle.labels
        for h in self.hooks:
            if h.wants_samples:
                h.samples(epoch, images, [labels[int(y)] for _, y in items],
                          [labels[int(p)] for p in pred], conf.tolist())  # fmt: skip

    def _write_plot(self, steps_per_epoch: int) -> None:
        if not self.dist.is_main:
            return
        png = loss_plot_png(self.step_losses, steps_per_epoch,
                            [h["val_loss"] for h in self.history],
                            title=f"{self.cfg.arch} on {self.cfg.dataset}")  # fmt: skip
        atomic_write_bytes(self.run_dir / PLOT_FILE, png)
