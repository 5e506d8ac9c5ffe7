"""ALEXNET_COMPILE=auto (app/registry.py `prepare`): torch.compile is measured against
eager at the first load on this machine and kept only where faster; the decision is cached
per graph, placement, torch and CPU, so a restart does not measure again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from app import registry
from app.registry import LoadedModel, prepare
from app.settings import Settings
from model.device import Placement
from tests.helpers.versions import make_version

FP32 = Placement(torch.device("cpu"), "fp32")
SIZES = (1,)


def load(version_dir: Path, cache: Path | None, mode: bool | str = "auto") -> LoadedModel:
    return prepare(version_dir, FP32, compile_model=mode, warmup_batch_sizes=SIZES,
                   cache_dir=cache)  # fmt: skip


def _no_compile(*_: Any, **__: Any) -> Any:
    raise AssertionError("torch.compile called")


def test_the_setting_takes_auto_true_and_false(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, value in (("auto", "auto"), ("true", True), ("false", False), ("1", True)):
        monkeypatch.setenv("ALEXNET_COMPILE", raw)
        assert Settings().compile == value  # type: ignore[call-arg]
    monkeypatch.setenv("ALEXNET_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="compile"):
        Settings()  # type: ignore[call-arg]


@pytest.mark.slow
def test_auto_measures_once_keeps_the_faster_and_caches_the_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = make_version(tmp_path / "models", probes=True)
    vdir, cache = tmp_path / "models" / card.version, tmp_path / "cache"
    first = load(vdir, cache)
    c = first.precision_check["compile"]
    assert c["mode"] == "auto" and c["cache"] == "miss" and c["speedup"] > 0
    assert isinstance(c["compile"], bool)  # (decided on the unrounded figure: not re-derived)
    assert first.compiled is c["compile"]
    if first.compiled:  # what serves compiled passed the probes as compiled
        assert first.precision_check["parity"]["compiled"]["passed"] is True
    [decision] = (cache / "compile").glob("*.json")
    doc = json.loads(decision.read_text())
    assert doc["compile"] is c["compile"] and doc["key"]["arch"] == card.arch
    assert doc["key"]["torch"] == torch.__version__ and "cpu" in doc["key"]

    # a restart reads the decision: no measurement; "eager" compiles nothing at all
    decision.write_text(json.dumps(dict(doc, compile=False, speedup=0.9)))
    monkeypatch.setattr(torch, "compile", _no_compile)
    again = load(vdir, cache)
    assert again.precision_check["compile"] == {"mode": "auto", "cache": "hit",
                                                "compile": False, "speedup": 0.9, "batch": 1}  # fmt: skip
    assert again.compiled is False
    # "compile" compiles (without measuring: the eager run is not timed again)
    monkeypatch.undo()
    decision.write_text(json.dumps(dict(doc, compile=True, speedup=1.5)))
    monkeypatch.setattr(registry, "_best_time", _no_compile)
    third = load(vdir, cache)
    assert third.compiled and third.precision_check["compile"]["cache"] == "hit"
    assert third.precision_check["parity"]["compiled"]["passed"] is True


def test_a_decision_for_another_machine_or_torch_is_not_used(tmp_path: Path) -> None:
    card = make_version(tmp_path / "models")
    key = registry.compile_key(card, FP32, 32, True)
    f = registry._compile_decision_file(tmp_path, key)
    assert f is not None
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"key": dict(key, torch="0.0.0"), "compile": True}))
    assert registry.read_compile_decision(tmp_path, key) is None  # (a hash collision guard)
    f.write_text("{not json")
    assert registry.read_compile_decision(tmp_path, key) is None
    f.write_text(json.dumps({"key": key, "compile": True}))
    assert registry.read_compile_decision(tmp_path, key) == {"key": key, "compile": True}
    other = registry.compile_key(card, Placement(torch.device("cpu"), "bf16"), 32, True)
    assert registry._compile_decision_file(tmp_path, other) != f


def test_auto_without_a_cache_folder_measures_and_says_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = make_version(tmp_path / "models")
    calls: list[int] = []

    def best_time(p: Any, x: torch.Tensor, rounds: int = 3) -> float:
        calls.append(len(x))
        return 1.0  # compiled no faster than eager: kept eager

    monkeypatch.setattr(registry, "_best_time", best_time)
    monkeypatch.setattr(torch, "compile", lambda m, **_: m)  # nothing to build
    loaded = load(tmp_path / "models" / card.version, None)
    c = loaded.precision_check["compile"]
    assert c["cache"] == "off" and c["compile"] is False and c["speedup"] == 1.0
    assert loaded.compiled is False and calls == [1, 1]


class _Broken(torch.nn.Module):
    """What torch.compile gives where it cannot build: a module that fails when called."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C++ compiler found")


@pytest.mark.parametrize("mode", [True, "auto"])
def test_a_compile_that_fails_serves_uncompiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: bool | str
) -> None:
    card = make_version(tmp_path / "models", probes=True)
    vdir, cache = tmp_path / "models" / card.version, tmp_path / "cache"
    if mode == "auto":  # a decision cached on a machine that could compile
        key = registry.compile_key(card, FP32, 1, True)
        f = registry._compile_decision_file(cache, key)
        assert f is not None
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"key": key, "compile": True, "speedup": 1.2}))
    monkeypatch.setattr(torch, "compile", lambda m, **_: _Broken(m))
    loaded = load(vdir, cache, mode)
    assert loaded.compiled is False
    assert "no C++ compiler found" in loaded.precision_check["compile_fallback"]
    rows = loaded.run_batch(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), 3)
    assert len(rows) == 2 and len(rows[0]) == 3
