"""int8 serving (model/quantize.py, app/registry.py `prepare`): the load-time guard on the
compiled program that serves, and the on-disk cache of that program."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.registry import LoadedModel, prepare
from model import device as D
from model import probes, quantize
from model.device import Placement
from tests.helpers.versions import make_version

CPU = torch.device("cpu")
INT8 = Placement(CPU, "int8")
SIZES = (1,)  # one compiled batch size: each build is ~15 s at 64 px on 2 cores

needs_torchao = pytest.mark.skipif(not quantize.available(), reason="torchao not installed")


def load(version_dir: Path, cache: Path, placement: Placement = INT8) -> LoadedModel:
    return prepare(version_dir, placement, warmup_batch_sizes=SIZES, cache_dir=cache)


def _refuse(*_: Any, **__: Any) -> Any:
    raise RuntimeError("quantized again")


# ------------------------------------------------------------------ cheap unit tests


def test_int8_program_pads_and_splits_batches() -> None:
    calls: list[int] = []

    def runner(bs: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            assert x.shape[0] == bs and x.is_contiguous()
            calls.append(bs)
            return x.flatten(1)[:, :2] * 2

        return run

    prog = quantize.Int8Program({8: runner(8), 1: runner(1)})
    x = torch.rand(19, 3, 4, 4)
    out = prog(x)
    assert out.shape == (19, 2) and torch.equal(out, x.flatten(1)[:, :2] * 2)
    assert calls == [8, 8, 8]  # 8 + 8 + 3 padded to 8
    assert prog(x[:1]).shape == (1, 2) and calls[-1] == 1
    assert next(prog.parameters()).dtype == torch.float32  # what Classifier reads


def test_the_cache_key_names_weights_torch_torchao_cpu_and_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = quantize.cache_key("a" * 64, 64)
    assert set(key) == {"format", "weights_sha256", "torch", "torchao", "cpu", "image_size"}
    h = quantize.key_hash(key)
    assert quantize.key_hash(quantize.cache_key("b" * 64, 64)) != h
    assert quantize.key_hash(quantize.cache_key("a" * 64, 224)) != h
    flags = frozenset({"avx512_vnni", "amx_int8"})
    name = quantize.cpu_info()[0]  # the same CPU model, other kernel flags
    monkeypatch.setattr(quantize, "cpu_info", lambda: (name, flags))
    assert quantize.key_hash(quantize.cache_key("a" * 64, 64)) != h
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0+test")
    assert quantize.key_hash(quantize.cache_key("a" * 64, 64)) != h


def test_int8_is_cpu_only_and_needs_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    for dev in ("cuda", "mps"):
        with pytest.raises(D.DeviceError, match=f"CPU only, not {dev}"):
            D.select_precision("int8", torch.device(dev))
    real = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))  # fmt: skip
    with pytest.raises(D.DeviceError, match=r"pip install 'alexnet-service\[int8\]'"):
        D.select_precision("int8", CPU)
    assert D.resolve("cpu", "auto").auto and not D.resolve("cpu", "fp32").auto


def test_the_int8_tolerances_sit_between_bf16s_and_above_fp16s() -> None:
    assert probes.TOLERANCE["fp16"] <= probes.TOLERANCE["int8"] <= 0.15
    assert probes.LOGIT_TOLERANCE["bf16"] < probes.LOGIT_TOLERANCE["int8"] <= 0.2


# ------------------------------------------------------------------ quantized, compiled


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def built(models: Path, cache: Path) -> tuple[Path, LoadedModel]:
    """One version quantized and compiled once for the whole module (~25 s)."""
    if not quantize.available():
        pytest.skip("torchao not installed")
    card = make_version(models, probes=True)
    return models / card.version, load(models / card.version, cache)


@pytest.mark.slow
def test_int8_is_served_when_it_passes_the_guard(built: tuple[Path, LoadedModel]) -> None:
    _, loaded = built
    check = loaded.precision_check
    assert loaded.placement.precision == "int8" and loaded.compiled
    assert loaded.info()["precision"] == "int8" and "fallback" not in check
    assert check["parity"]["int8"]["passed"] is True
    assert check["parity"]["int8"]["tolerance"] == probes.TOLERANCE["int8"]
    assert check["agreement"]["int8"] >= 0.99
    i8 = check["int8"]
    assert i8["cache"] == "miss" and i8["quantize_s"] > 0 and i8["compile_s"] > 0
    assert i8["speedup_vs_fp32"] > 0  # measured at the first load, kept in the cache
    rows = loaded.run_batch(torch.zeros(3, 3, 64, 64, dtype=torch.uint8), 2)
    assert len(rows) == 3 and len(rows[0]) == 2


@pytest.mark.slow
def test_a_restart_loads_the_cached_program_without_quantizing(
    built: tuple[Path, LoadedModel], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version_dir, _ = built
    monkeypatch.setattr(quantize, "quantize", _refuse)
    loaded = load(version_dir, cache)
    i8 = loaded.precision_check["int8"]
    assert loaded.placement.precision == "int8"
    assert i8["cache"] == "hit" and "quantize_s" not in i8 and "compile_s" not in i8
    assert i8["speedup_vs_fp32"] == built[1].precision_check["int8"]["speedup_vs_fp32"]
    # auto serves the cached, guard-passing program where it measured faster than fp32
    folder = quantize.cached(cache, loaded.card.version,
                             quantize.cache_key(loaded.card.sha256, loaded.card.image_size),
                             SIZES)  # fmt: skip
    assert folder is not None
    meta = quantize.read_meta(folder)
    try:
        for speedup, expected in ((2.0, "int8"), (0.8, D.select_precision("auto", CPU))):
            quantize.write_meta(folder, dict(meta, speedup_vs_fp32=speedup))
            auto = load(version_dir, cache, D.resolve("cpu", "auto"))
            assert auto.placement.precision == expected, speedup
    finally:
        quantize.write_meta(folder, meta)


@pytest.mark.slow
def test_another_torch_version_misses_the_cache(
    built: tuple[Path, LoadedModel], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version_dir, _ = built
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    monkeypatch.setattr(quantize, "quantize", _refuse)
    loaded = load(version_dir, cache)  # a miss: it quantizes again (here: refused)
    assert loaded.placement.precision != "int8"
    assert (
        "int8 could not be built: RuntimeError: quantized again"
        in (loaded.precision_check["fallback"])
    )
    # and auto, finding no program for this torch, never quantizes at load
    auto = load(version_dir, cache, D.resolve("cpu", "auto"))
    assert auto.placement.precision == D.select_precision("auto", CPU)
    assert "fallback" not in auto.precision_check


def test_an_unwritable_cache_is_no_cache_not_a_crash(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = make_version(models, seed=3)
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setattr(quantize, "quantize", _refuse)
    loaded = load(models / card.version, tmp_path / "file" / "cache")
    assert loaded.placement.precision in ("bf16", "fp32")
    assert "quantized again" in loaded.precision_check["fallback"]


@pytest.mark.slow
def test_a_corrupt_cached_program_is_discarded_and_rebuilt(
    built: tuple[Path, LoadedModel], cache: Path
) -> None:
    version_dir, _ = built
    (program,) = cache.glob("int8/*/b1.pt2")
    program.write_bytes(b"PK\x03\x04 not a package")
    loaded = load(version_dir, cache)
    i8 = loaded.precision_check["int8"]
    assert loaded.placement.precision == "int8"
    # refused by the sha256 recorded at compile time, before it was loaded as a library
    assert i8["cache"] == "rebuilt" and "b1.pt2 did not load (Int8Error)" in i8["cache_notes"][0]
    meta = json.loads((program.parent / "meta.json").read_text())
    assert meta["files"]["b1.pt2"] == quantize.file_sha256(program)
    assert program.stat().st_size > 1_000_000


@pytest.mark.slow
def test_int8_that_fails_the_guard_is_not_served(models: Path, cache: Path) -> None:
    """fc8 rows 0 and 1 closer than int8's step: int8 ties them, fp32 does not."""
    card = make_version(models, probes=True, int8_fragile=True, seed=1)
    loaded = load(models / card.version, cache)
    check = loaded.precision_check
    assert loaded.placement.precision == "fp32"  # bf16 ties them too
    assert check["int8"]["cache"] == "miss"  # another version: another program
    assert check["parity"]["int8"]["passed"] is False
    assert check["fallback"].startswith("int8 fails the probes: probe probes/")
    (folder,) = [f for f in cache.glob("int8/*") if f.name.startswith(card.version)]
    assert json.loads((folder / "meta.json").read_text())["guard_passed"] is False
    # auto never serves a program that failed the guard, and does not build one
    auto = load(models / card.version, cache, D.resolve("cpu", "auto"))
    assert auto.placement.precision != "int8" and "int8" not in auto.precision_check


def test_an_int8_program_that_fails_to_run_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import registry
    from model.predictor import Predictor

    card = make_version(tmp_path / "models", probes=True)

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))  # (float32, as int8 programs report)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("illegal instruction in the program")

    def broken(ref: Predictor, *_: Any, **__: Any) -> tuple[Predictor, None]:
        return Predictor(Broken(), ref.card, Placement(CPU, "int8"), channels_last=False), None

    monkeypatch.setattr(registry, "_int8_predictor", broken)
    loaded = load(tmp_path / "models" / card.version, tmp_path / "cache")
    assert loaded.placement.precision != "int8"
    assert (
        "int8 failed to run: RuntimeError: illegal instruction"
        in loaded.precision_check["fallback"]
    )


def test_superseded_and_deleted_versions_leave_no_programs(tmp_path: Path) -> None:
    key = quantize.cache_key("a" * 64, 64)

    def folder(name: str, **changes: Any) -> Path:
        d = tmp_path / "int8" / name
        d.mkdir(parents=True)
        (d / "b1.pt2").write_bytes(b"x" * 100)
        quantize.write_meta(d, {"key": {**key, **changes}})
        return d

    new = folder("v1-new")
    old_torch = folder("v1-oldtorch", torch="0.0.0")
    other_cpu = folder("v1-othercpu", cpu={"model": "another", "flags": []})
    garbage = tmp_path / "int8" / "v1-garbage"
    garbage.mkdir()
    other_version = folder("v2-new")
    freed = quantize.remove_cached(tmp_path, "v1", superseded_by=(new, key))
    assert freed > 100 and not old_torch.exists() and not garbage.exists()  # (+ meta.json)
    assert new.exists() and other_cpu.exists() and other_version.exists()
    # deleting the version: all of its programs, whatever they were built for
    assert quantize.remove_cached(tmp_path, "v1") > 0
    assert not new.exists() and not other_cpu.exists() and other_version.exists()
    assert quantize.remove_cached(None, "v2") == 0 and other_version.exists()
