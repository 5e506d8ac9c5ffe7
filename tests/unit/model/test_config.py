"""model/config.py: what a training config refuses."""

from __future__ import annotations

import pytest

from model.config import TrainConfig


def test_early_stopping_must_be_more_patient_than_the_scheduler() -> None:
    with pytest.raises(ValueError, match="greater than the plateau"):
        TrainConfig(dataset="synthetic", patience=3)
    TrainConfig(dataset="synthetic", scheduler="step", patience=3)


@pytest.mark.parametrize("bad", ["../etc", "/abs", "imagefolder:../x", "imagefolder:", "mnist"])
def test_datasets_are_names_not_paths(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        TrainConfig(dataset=bad)
