"""Datasets by name (`cifar10`, `synthetic[:N]`, `imagefolder:NAME`), the seeded train/val
split, loaders, and the batched on-device input stage (eval transform or augmentation).

Every dataset yields uint8 images of one fixed size per dataset; resizing to the network's
size, cropping and flipping then happen per batch on the training device.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from model import synthetic
from model.images import decode_tensor
from model.transforms import EvalTransform, Preprocessing

log = logging.getLogger(__name__)

CIFAR10_LABELS = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Snapshots of labelled feedback a job reads (`feedback:<id>` -> data/.feedback/<id>/).
FEEDBACK_SNAPSHOTS: Final = ".feedback"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


class DatasetError(ValueError):
    """A dataset that cannot be used; the message says what to fix."""


class TensorImages(Dataset[tuple[torch.Tensor, int]]):
    """In-memory uint8 images (N, 3, H, W) and labels (CIFAR-10)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int]) -> None:
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


class ImageFiles(Dataset[tuple[torch.Tensor, int]]):
    """Image files decoded with the service's decoder, resized so the shorter side is
    `side` and centre-cropped to `side` x `side` (the rest happens on the device)."""

    def __init__(self, files: list[tuple[Path, int]], side: int) -> None:
        self.files, self.side = files, side
        self.eval_square = EvalTransform(Preprocessing(side, side))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        return self.load(path.read_bytes()), label

    def load(self, data: bytes) -> torch.Tensor:
        """One file's bytes as this dataset yields them (the version's probes use it)."""
        return self.eval_square(decode_tensor(data, min_side=self.side))


def label_counts(ds: Dataset[tuple[torch.Tensor, int]], num_classes: int) -> list[int] | None:
    """How many images of each class `ds` holds, from its labels alone (no image is
    decoded); None for a dataset whose labels are only known by loading it."""
    from model.probes import dataset_item

    counts = [0] * num_classes
    for i in range(len(ds)):  # type: ignore[arg-type]
        inner, j = dataset_item(ds, i)
        if isinstance(inner, synthetic.SyntheticShapes):
            label = j % len(synthetic.LABELS)
        elif isinstance(inner, ImageFiles):
            label = inner.files[j][1]
        elif isinstance(inner, TensorImages):
            label = int(inner.targets[j])
        else:
            return None
        counts[label] += 1
    return counts


@dataclass
class DatasetBundle:
    """A dataset resolved by name: its splits, labels and preprocessing."""

    spec: str
    labels: list[str]
    pre: Preprocessing
    train: Subset[tuple[torch.Tensor, int]]
    val: Subset[tuple[torch.Tensor, int]]
    test: Dataset[tuple[torch.Tensor, int]] | None = None
    split: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # unreadable files, reported
    # What the data was: an imagefolder's content hash (its manifest's), else a hash of
    # what determines the images (synthetic: size and seed; cifar10: its arrays).
    hash: str | None = None
    # What the holdout was (an imagefolder's holdout paths and hashes; synthetic's seed).
    holdout_hash: str | None = None


def split_indices(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation cut into (train, val); the same (n, val_split, seed) always
    gives the same split."""
    n_val = max(1, round(n * val_split))
    if n - n_val < 1:
        raise DatasetError(f"{n} images are too few to split with val_split={val_split}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def resolve_dataset_dir(data_dir: Path, name: str) -> Path:
    """`data_dir/name`, refusing anything that leaves `data_dir` (.., absolute paths,
    symlinks pointing outside)."""
    root = data_dir.resolve()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise DatasetError(f"imagefolder name {name!r} must be a plain folder name")
    path = (data_dir / name).resolve()
    if path.parent != root:
        raise DatasetError(f"imagefolder {name!r} resolves outside the data dir {root}")
    return path


def load_cifar10(root: Path, train: bool) -> TensorImages:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=True)
    except Exception as exc:
        raise DatasetError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({exc}); put "
            f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py folder) in {root}"
        ) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return TensorImages(images, ds.targets)


def load_dataset(
    spec: str,
    *,
    data_dir: Path,
    image_size: int,
    val_split: float,
    seed: int,
    pre: Preprocessing | None = None,
    holdout_share: float = 0.15,
) -> DatasetBundle:
    """Resolve a dataset by name and split it. `pre` (a checkpoint's preprocessing, for
    evaluation) overrides the dataset's own. Validation uses the eval transform only."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else synthetic.DEFAULT_SIZE
        pre = pre or Preprocessing.for_size(
            image_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
        )
        full: Dataset[tuple[torch.Tensor, int]] = synthetic.SyntheticShapes(
            n, pre.resize_size, seed
        )
        labels = list(synthetic.LABELS)
        digest = _hash(f"synthetic:{n}:{pre.resize_size}:{seed}".encode())
        held = _hash(f"synthetic-holdout:{max(n // 5, 10)}:{seed + 1_000_003}".encode())
        # A disjoint held-out set (evaluation, promotion): another seed stream.
        test: Dataset[tuple[torch.Tensor, int]] | None = synthetic.SyntheticShapes(
            max(n // 5, 10), pre.resize_size, seed + 1_000_003
        )
        skipped: list[str] = []
    elif spec == "cifar10":
        root = data_dir / "cifar10"
        pre = pre or Preprocessing.for_size(image_size, mean=CIFAR10_MEAN, std=CIFAR10_STD)
        cifar = load_cifar10(root, train=True)
        full, test = cifar, load_cifar10(root, train=False)
        labels, skipped = list(CIFAR10_LABELS), []
        digest = _hash(cifar.images.numpy().tobytes(), cifar.targets.numpy().tobytes())
        held = _hash(b"cifar10-test-batch")
    elif spec.startswith("imagefolder:"):
        path = resolve_dataset_dir(data_dir, spec.split(":", 1)[1])
        pre = pre or Preprocessing.for_size(image_size)
        return imagefolder_bundle(spec, path, pre, val_split=val_split, seed=seed,
                                  holdout_share=holdout_share)  # fmt: skip
    elif spec.startswith("feedback:"):
        path = resolve_dataset_dir(data_dir / FEEDBACK_SNAPSHOTS, spec.split(":", 1)[1])
        if not (path / "manifest.json").is_file():
            raise DatasetError(f"{spec}: that snapshot of labelled feedback is gone (a job's "
                               "snapshot is removed when the job ends)")  # fmt: skip
        pre = pre or Preprocessing.for_size(image_size)
        return imagefolder_bundle(spec, path, pre, val_split=val_split, seed=seed,
                                  holdout_share=holdout_share)  # fmt: skip
    elif spec == "feedback":
        raise DatasetError(
            "dataset feedback is made by the service for a job (POST /admin/jobs with "
            '"dataset": "feedback"); from the command line, export it first: alexnet '
            "feedback export --dataset NAME, then --dataset imagefolder:NAME"
        )
    else:
        raise DatasetError(
            f"unknown dataset {spec!r}: expected cifar10, synthetic, imagefolder:NAME or feedback"
        )
    n = len(full)  # type: ignore[arg-type]
    train_idx, val_idx = split_indices(n, val_split, seed)
    return DatasetBundle(
        spec=spec,
        labels=labels,
        pre=pre,
        train=Subset(full, train_idx),
        val=Subset(full, val_idx),
        test=test,
        split={"n": n, "val_split": val_split, "seed": seed, "train": len(train_idx),
               "val": len(val_idx)},
        skipped=skipped,
        hash=digest,
        holdout_hash=held,
    )  # fmt: skip


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def with_feedback(bundle: DatasetBundle, extra: DatasetBundle) -> DatasetBundle:
    """`bundle` with a feedback snapshot's train and validation images added to its own
    (the same labels in the same order; preprocessed as `bundle` says). The snapshot's
    holdout stays out of training; `bundle`'s holdout is still the holdout."""
    if extra.labels != bundle.labels:
        raise DatasetError(
            f"{extra.spec}'s labels are not {bundle.spec}'s ({', '.join(bundle.labels[:4])}...): "
            "feedback can only be added to a dataset with the answering versions' labels"
        )
    n_train, n_val = len(bundle.train), len(bundle.val)
    parts: list[Dataset[tuple[torch.Tensor, int]]] = [bundle.train, extra.train, bundle.val,
                                                      extra.val]  # fmt: skip
    full: ConcatDataset[tuple[torch.Tensor, int]] = ConcatDataset(parts)
    a = n_train + len(extra.train)
    split = {**bundle.split, "feedback": {
        "spec": extra.spec, "train": len(extra.train), "val": len(extra.val),
        "holdout_kept_out": extra.split.get("holdout", 0), "hash": extra.hash,
        "holdout_hash": extra.holdout_hash}}  # fmt: skip
    return DatasetBundle(
        spec=bundle.spec, labels=bundle.labels, pre=bundle.pre,
        train=Subset(full, range(a)), val=Subset(full, range(a, a + n_val + len(extra.val))),
        test=bundle.test, split=split, skipped=bundle.skipped + extra.skipped,
        hash=_hash(f"{bundle.hash}+{extra.hash}".encode()), holdout_hash=bundle.holdout_hash,
    )  # fmt: skip


def imagefolder_bundle(spec: str, path: Path, pre: Preprocessing, *, val_split: float,
                       seed: int, holdout_share: float) -> DatasetBundle:  # fmt: skip
    """An imagefolder through its manifest (written now for a folder made by hand): the
    frozen holdout is never in train or val; a pre-split dataset keeps its train/ and val/,
    the rest is split by (val_split, seed)."""
    from model.datasets import ensure_manifest

    if not path.is_dir():
        raise DatasetError(
            f"imagefolder {path} does not exist: import an archive of class folders "
            f"(POST /admin/datasets/{path.name}, or alexnet datasets import), or create one "
            "folder per class in it"
        )
    man = ensure_manifest(path, holdout_share=holdout_share)
    missing = [p for p, _ in man.files("trainval", "train", "val", "holdout")
               if not (path / p).is_file()]  # fmt: skip
    if missing:
        raise DatasetError(
            f"imagefolder {path}: {len(missing)} image(s) its manifest lists are gone "
            f"({', '.join(missing[:3])}...): re-import the dataset"
        )

    def files(*splits: str) -> list[tuple[Path, int]]:
        return [(path / p, label) for p, label in man.files(*splits)]

    if man.layout == "pre_split" and man.files("val"):
        train_files, val_files = files("train"), files("val")
    else:
        pool = files("trainval", "train")
        # (a holdout-only folder, as judging on feedback makes, has nothing to split)
        t_idx, v_idx = split_indices(len(pool), val_split, seed) if pool else ([], [])
        train_files, val_files = [pool[i] for i in t_idx], [pool[i] for i in v_idx]
    holdout = files("holdout")
    full = ImageFiles(train_files + val_files, pre.resize_size)
    n_train = len(train_files)
    return DatasetBundle(
        spec=spec, labels=list(man.classes), pre=pre,
        train=Subset(full, range(n_train)), val=Subset(full, range(n_train, len(full))),
        test=ImageFiles(holdout, pre.resize_size) if holdout else None,
        split={"n": len(full), "val_split": val_split, "seed": seed, "train": n_train,
               "val": len(val_files), "holdout": len(holdout), "layout": man.layout,
               "dataset_hash": man.hash},
        skipped=[f"{s['path']}: {s['reason']}" for s in man.skipped], hash=man.hash,
        holdout_hash=man.holdout.get("hash"),
    )  # fmt: skip


# ----------------------------------------------------------------------------- loading


class ShardSampler(Sampler[int]):
    """Indices of this rank's shard for one epoch, from `start` (to resume mid-epoch).

    Training: a permutation seeded by (seed, epoch), padded so every rank gets the same
    number of batches (as DistributedSampler does). Validation (`shuffle=False`): a plain
    strided, unpadded shard, so all-reduced sums count every image exactly once.
    """

    def __init__(
        self, n: int, *, rank: int = 0, world: int = 1, shuffle: bool, seed: int = 0
    ) -> None:
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        per_rank = -(-self.n // self.world)
        order += order[: per_rank * self.world - self.n]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


def make_loader(
    ds: Dataset[tuple[torch.Tensor, int]],
    sampler: ShardSampler,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool,
) -> DataLoader[tuple[torch.Tensor, int]]:
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        drop_last=False,
        # Its own generator: creating an iterator must not consume the global RNG (which
        # dropout draws from), or a resumed epoch would drop different units.
        generator=torch.Generator(),
        worker_init_fn=_worker_ignores_stop_signals if workers else None,
    )


_STOP_SIGNALS: Final = {signal.SIGTERM, signal.SIGINT}


def _worker_ignores_stop_signals(_worker_id: int) -> None:
    """Stopping is the trainer's job: it finishes its step, saves and then shuts its
    workers down itself. A worker that died of a SIGTERM or Ctrl-C sent to the whole
    process group (a job runner, a terminal) would instead fail the run with "DataLoader
    worker is killed by signal" before the state is saved. (The signals arrive blocked,
    see `batches`; one sent meanwhile is pending, and discarded once ignored.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def batches(loader: DataLoader[tuple[torch.Tensor, int]]) -> Iterator[Any]:
    """`iter(loader)`, with SIGTERM and SIGINT blocked while its workers are forked, so no
    signal lands between a worker's start and its `worker_init_fn` (where torch's own
    handler would still kill it). The trainer gets a signal sent meanwhile right after.
    Yields the loader's batches: (images (B, 3, H, W) uint8, labels (B,))."""
    if loader.num_workers == 0 or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class TrainAugment:
    """The paper's augmentation on a device batch: resize to `resize_size`, a random
    `image_size` crop and a random horizontal flip per image. Randomness comes from
    `generator`, which the trainer seeds per (seed, epoch, step) so a resumed run sees
    exactly the crops it would have seen."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        self.to_resize = EvalTransform(Preprocessing(pre.resize_size, pre.resize_size))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.shape[-1] != self.pre.resize_size or x.shape[-2] != self.pre.resize_size:
            x = self.to_resize(x)
        b, s, r = x.shape[0], self.pre.image_size, self.pre.resize_size
        offsets = torch.randint(0, r - s + 1, (b, 2), generator=generator).tolist()
        flips = torch.rand(b, generator=generator).lt(0.5).tolist()
        crops = []
        for i, ((oy, ox), flip) in enumerate(zip(offsets, flips, strict=True)):
            crop = x[i, :, oy : oy + s, ox : ox + s]  # (3, s, s)
            crops.append(crop.flip(-1) if flip else crop)
        return torch.stack(crops)  # (B, 3, s, s)


@dataclass
class RunLoaders:
    """What one process of a run reads: its training shard (reshuffled each epoch) and its
    validation shard."""

    train_sampler: ShardSampler
    train: DataLoader[tuple[torch.Tensor, int]]
    val: DataLoader[tuple[torch.Tensor, int]]
    steps_per_epoch: int


def run_loaders(bundle: DatasetBundle, *, batch_size: int, workers: int, pin_memory: bool,
                seed: int, rank: int = 0, world: int = 1) -> RunLoaders:  # fmt: skip
    train_sampler = ShardSampler(len(bundle.train), rank=rank, world=world, shuffle=True,
                                 seed=seed)  # fmt: skip
    val_sampler = ShardSampler(len(bundle.val), rank=rank, world=world, shuffle=False)
    kw: dict[str, Any] = {"batch_size": batch_size, "workers": workers, "pin_memory": pin_memory}
    return RunLoaders(train_sampler, make_loader(bundle.train, train_sampler, **kw),
                      make_loader(bundle.val, val_sampler, **kw),
                      math.ceil(len(train_sampler.indices()) / batch_size))  # fmt: skip
