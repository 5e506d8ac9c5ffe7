"""model/data.py's pieces on their own: the seeded split, the shard sampler, and the data
dir's refusal of names that leave it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model.data import DatasetError, ShardSampler, load_dataset, resolve_dataset_dir, split_indices


@pytest.mark.parametrize(("n", "val_split"), [(10, 0.2), (101, 0.3), (2, 0.5), (1000, 0.01)])
def test_a_split_is_a_seeded_partition(n: int, val_split: float) -> None:
    train, val = split_indices(n, val_split, seed=3)
    assert sorted(train + val) == list(range(n))  # every index once
    assert len(val) == max(1, round(n * val_split))
    assert (train, val) == split_indices(n, val_split, seed=3)  # the same seed, the same split
    assert train == sorted(train) and val == sorted(val)


def test_another_seed_another_split_and_too_few_images_refused() -> None:
    assert split_indices(100, 0.2, seed=0) != split_indices(100, 0.2, seed=1)
    with pytest.raises(DatasetError, match="too few"):
        split_indices(1, 0.5, seed=0)


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 3), (7, 4), (64, 8)])
def test_training_shards_cover_every_image_with_equal_lengths(n: int, world: int) -> None:
    shards = [ShardSampler(n, rank=r, world=world, shuffle=True, seed=5) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    lists = [list(s) for s in shards]
    assert len({len(x) for x in lists}) == 1  # padded: every rank runs as many batches
    assert set().union(*map(set, lists)) == set(range(n))
    assert sum(map(len, lists)) - n < world  # padding only to the next multiple


def test_each_epoch_its_own_order_and_a_resume_continues_it() -> None:
    s = ShardSampler(50, shuffle=True, seed=1)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first)
    s.set_epoch(0, start=20)  # a run resumed 20 images into epoch 0
    assert list(s) == first[20:] and len(s) == 30


def test_validation_shards_are_unpadded_and_disjoint() -> None:
    shards = [list(ShardSampler(10, rank=r, world=3, shuffle=False)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # each image counted once


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../x", "/etc", "a\\b"])
def test_names_that_leave_the_data_dir_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError):
        resolve_dataset_dir(tmp_path, name)


def test_a_symlink_out_of_the_data_dir_is_refused(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    os.symlink(outside, data / "flowers")
    with pytest.raises(DatasetError, match="outside the data dir"):
        resolve_dataset_dir(data, "flowers")
    (data / "cats").mkdir()
    assert resolve_dataset_dir(data, "cats") == (data / "cats").resolve()


def test_split_is_seeded_and_reproducible(tmp_path: Path) -> None:
    a = load_dataset("synthetic:100", data_dir=tmp_path, image_size=64, val_split=0.2, seed=3)
    b = load_dataset("synthetic:100", data_dir=tmp_path, image_size=64, val_split=0.2, seed=3)
    c = load_dataset("synthetic:100", data_dir=tmp_path, image_size=64, val_split=0.2, seed=4)
    assert a.val.indices == b.val.indices != c.val.indices
    assert len(a.val) == 20 and not set(a.val.indices) & set(a.train.indices)
    assert a.split == {"n": 100, "val_split": 0.2, "seed": 3, "train": 80, "val": 20}
