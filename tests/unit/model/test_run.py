"""model/run.py: the job contract. A config survives the command line both ways, every
field has an option, and events survive their JSON line."""

from __future__ import annotations

import argparse

import pytest

from model.config import TrainConfig
from model.run import (
    EpochEnd,
    Failed,
    Start,
    add_config_options,
    config_argv,
    config_given,
    event_line,
    parse_event,
)


def _parse(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser()
    add_config_options(p)
    return TrainConfig.model_validate(config_given(p.parse_args(argv)))


@pytest.mark.parametrize("config", [
    {"dataset": "synthetic"},
    {"dataset": "synthetic:100", "image_size": 64, "augment": False, "workers": 0,
     "scheduler": "cosine", "lr": 0.05, "base": "v1", "precision": "fp32"},
    {"dataset": "imagefolder:flowers", "augment": True, "min_delta": 0.001, "arch": "alexnet-paper"},
])  # fmt: skip
def test_a_config_survives_the_command_line(config: dict[str, object]) -> None:
    cfg = TrainConfig.model_validate(config)
    assert _parse(config_argv(cfg.model_dump(mode="json"))) == cfg


def test_every_config_field_is_an_option_with_its_default_in_the_help() -> None:
    p = argparse.ArgumentParser()
    add_config_options(p)
    dests = {a.dest: a for a in p._actions}
    for name, field in TrainConfig.model_fields.items():
        assert name in dests, name
        assert dests[name].default is None  # only what is given reaches the config
        if field.default is not None and not field.is_required():
            assert f"(default {field.default})" in (dests[name].help or ""), name
    assert dests["scheduler"].choices == ["plateau", "step", "cosine"]


def test_options_are_checked_by_the_config() -> None:
    with pytest.raises(ValueError, match="patience"):
        _parse(["--dataset", "synthetic", "--patience", "2"])


def test_events_survive_their_json_line() -> None:
    ev = EpochEnd(epoch=2, train_loss=1.0, val_loss=0.9, val_top1=0.5, val_top5=0.9, lr=0.01,
                  grad_norm=1.5, images_per_s=100.0, epoch_time_s=3.0, epochs=5,
                  improved=True, early_stop=False, next_lr=0.01)  # fmt: skip
    line = event_line(ev)
    assert line.endswith("\n") and line.count("\n") == 1
    assert parse_event(line) == ev
    assert ev.record()["improved"] is True and "next_lr" not in ev.record()
    start = Start(config={}, labels=["a"], split={}, device={}, epochs=1, steps_per_epoch=1,
                  resumed_from=(2, 3))  # fmt: skip
    assert parse_event(event_line(start)) == start
    assert isinstance(parse_event('{"type": "failed", "error": "x", "time": 1}'), Failed)


@pytest.mark.parametrize("line", ['{"type": "nonsense"}', '{"type": "step"}', "not json", ""])
def test_unknown_or_cut_lines_are_skipped(line: str) -> None:
    assert parse_event(line) is None
