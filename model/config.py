"""Training options: one schema for `alexnet train`, POST /admin/jobs and the saved run.

Field names are the CLI's long options in snake_case; bounds live here once."""

from __future__ import annotations

import re
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The schedulers' own patience; early stopping must be more patient than these.
PLATEAU_PATIENCE: Final = 3
STEP_PATIENCE: Final = 2
# Matched whole (fullmatch: "synthetic\n" is not "synthetic") and in ASCII only (no
# Arabic-Indic digits in a size, no letters outside A-Z in a name).
DATASET_RE: Final = re.compile(
    r"(cifar10|synthetic(:[0-9]{2,7})?|imagefolder:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
    r"|feedback(:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})?)"
)


class TrainConfig(BaseModel):
    """Everything that determines a training run (and so is stored with it)."""

    # strict: no silent coercions (`"workers": false` is not 0, `"epochs": "5"` not 5)
    # allow_inf_nan=False: `"min_delta": Infinity` (or 1e309) is refused, not shown later as
    # null in an answer that breaks the API's own schema
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    dataset: str = Field(
        description="cifar10, synthetic (synthetic:N for N images), or imagefolder:NAME "
        "(a folder-per-class tree under the data dir; a name, not a path)",
        examples=["synthetic", "cifar10", "imagefolder:flowers"],
    )
    arch: Literal["alexnet", "alexnet-paper"] = Field(
        "alexnet", description="alexnet (torchvision's layout) or alexnet-paper (the 2012 one)"
    )
    epochs: int = Field(50, ge=1, le=10_000, description="maximum epochs")
    batch_size: int = Field(128, ge=1, le=8192, description="images per step (per process)")
    lr: float = Field(0.01, gt=0, le=10, description="initial learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 weight decay")
    scheduler: Literal["plateau", "step", "cosine"] = Field(
        "plateau",
        description="plateau (the article's), step (the paper's /10 on a stall) or cosine "
        "(per-step decay to 0 over the run)",
    )
    patience: int = Field(7, ge=1, le=1000, description="early-stopping patience, in epochs")
    min_delta: float = Field(0.0, ge=0, description="smallest val-loss drop that counts")
    image_size: int = Field(224, ge=63, le=512, description="network input side, in pixels")
    val_split: float = Field(0.2, gt=0, lt=1, description="fraction held out for validation")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the split, weights and order")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: CUDA, then Apple MPS, then the CPU"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device runs it fast, else fp32"
    )
    init: Literal["default", "paper"] = Field(
        "default",
        description="weight initialisation: Kaiming convolutions (default) or the paper's N(0, 0.01) with biases of 1",
    )
    dropout: float = Field(
        0.5, ge=0, lt=1, description="dropout on fc6/fc7 (the paper's 0.5); lower learns faster"
    )
    augment: bool | None = Field(
        None, description="random crop + flip; default: on for cifar10/imagefolder"
    )
    workers: int | None = Field(None, ge=0, le=64, description="DataLoader workers")
    base: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="fine-tune from this model version (or `active`): its weights, and its "
        "image size and preprocessing unless image_size is given; the last layer is "
        "re-initialised when the number of classes differs. null: from scratch",
        examples=[None, "20261127-031500-ab12"],
    )

    freeze: Literal["none", "features", "all-but-head"] = Field(
        "none",
        description="with a base: none (train every layer), features (the conv layers stay as "
        "the base has them) or all-but-head (only the last layer learns: a linear probe, "
        "seconds on a CPU)",
    )
    base_lr_scale: float = Field(
        1.0, gt=0, le=1,
        description="with a base: the learning rate of the layers kept from it (and not "
        "frozen) is lr times this (e.g. 0.1); a re-initialised last layer learns at lr",
    )  # fmt: skip

    # Recipe options from torchvision's and timm's references (all off by default).
    warmup_epochs: int = Field(
        0, ge=0, le=1000,
        description="linear learning-rate warmup over this many epochs, per step from lr/100 "
        "to lr (torchvision's lr_warmup_epochs); plateau and step count from its end, cosine "
        "decays over the epochs after it. 0: none",
    )  # fmt: skip
    label_smoothing: float = Field(
        0.0, ge=0, lt=1,
        description="cross-entropy label smoothing of the training loss (torchvision's "
        "reference uses 0.1); validation loss stays plain cross-entropy. 0: none",
    )  # fmt: skip
    clip_grad_norm: float | None = Field(
        None, gt=0, le=1e6,
        description="clip the gradients' global L2 norm to this before each step (the logged "
        "grad_norm is the norm before clipping). null: no clipping",
    )  # fmt: skip
    ema_decay: float | None = Field(
        None, gt=0, lt=1,
        description="keep an exponential moving average of the weights, updated after every "
        "step with this decay (e.g. 0.999); the averaged weights are what is validated, kept "
        "as best and saved as the version. null: none",
    )  # fmt: skip
    checkpoint_every_steps: int | None = Field(
        None, ge=1,
        description="also save the resumable state every N optimizer steps, not only at each "
        "epoch's end: a run restarted after a dead worker (torchrun --max-restarts) or a "
        "crash loses at most N steps. null: at each epoch's end only",
    )  # fmt: skip

    feedback: str | None = Field(
        None,
        pattern=r"^feedback:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="a snapshot of labelled feedback (feedback:ID, which the service makes for "
        "a job with include_feedback) whose train share is added to the dataset's train and "
        "validation images; its holdout is never trained on",
    )

    @field_validator("dataset")
    @classmethod
    def _dataset_by_name(cls, v: str) -> str:
        if not DATASET_RE.fullmatch(v):
            raise ValueError(
                f"unknown dataset {v!r}: expected cifar10, synthetic, synthetic:N, "
                "imagefolder:NAME (NAME: letters, digits, '.', '_', '-'; no paths) or feedback"
            )
        return v

    @model_validator(mode="after")
    def _fine_tune_options_need_a_base(self) -> TrainConfig:
        if self.base is None and (self.freeze != "none" or self.base_lr_scale != 1.0):
            raise ValueError(
                "freeze and base_lr_scale apply to a fine-tune: give base (a version, or "
                "active) as well"
            )
        return self

    @model_validator(mode="after")
    def _warmup_shorter_than_the_run(self) -> TrainConfig:
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs {self.warmup_epochs} must be fewer than epochs ({self.epochs}): "
                "the run would end before the learning rate reaches lr"
            )
        return self

    @model_validator(mode="after")
    def _patience_longer_than_scheduler(self) -> TrainConfig:
        sched = {"plateau": PLATEAU_PATIENCE, "step": STEP_PATIENCE}.get(self.scheduler, 0)
        if self.patience <= sched:
            raise ValueError(
                f"patience {self.patience} must be greater than the {self.scheduler} "
                f"scheduler's patience ({sched}), or training stops before the rate drops"
            )
        return self

    @property
    def use_augmentation(self) -> bool:
        if self.augment is not None:
            return self.augment
        return not self.dataset.startswith("synthetic")
