"""The on-disk format: round trip, refusal of every kind of bad file, atomicity."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from model import checkpoint as C
from model import files
from model.checkpoint import CheckpointError, load_version, save_version
from model.network import build_model
from model.transforms import Preprocessing
from tests.helpers.versions import make_version


def _rewrite_weights(vdir: Path, data: bytes, *, fix_sha: bool = True) -> None:
    (vdir / C.WEIGHTS_FILE).write_bytes(data)
    if fix_sha:
        card = json.loads((vdir / C.CARD_FILE).read_text())
        card["sha256"] = C.sha256_bytes(data)
        (vdir / C.CARD_FILE).write_text(json.dumps(card))


def test_round_trip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model("alexnet-paper", num_classes=3)
    card = save_version(tmp_path, net, arch="alexnet-paper", labels=["a", "b", "c"],
                        pre=Preprocessing.for_size(96), metrics={"val_top1": 0.5},
                        dataset="synthetic", parent="v0")  # fmt: skip
    loaded, card2 = load_version(tmp_path / card.version)
    assert card2 == card
    assert card2.labels == ["a", "b", "c"] and card2.image_size == 96 and card2.resize_size == 110
    assert card2.parent == "v0" and card2.metrics["val_top1"] == 0.5
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    on_disk = json.loads((tmp_path / card.version / C.CARD_FILE).read_text())
    for key in (
        "format_version",
        "arch",
        "num_classes",
        "labels",
        "image_size",
        "mean",
        "std",
        "resize",
        "metrics",
        "dataset",
        "train_config",
        "parent",
        "created_at",
        "sha256",
    ):
        assert key in on_disk  # fmt: skip


def test_one_flipped_byte_is_refused(tmp_path: Path) -> None:
    card = make_version(tmp_path)
    vdir = tmp_path / card.version
    data = bytearray((vdir / C.WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    _rewrite_weights(vdir, bytes(data), fix_sha=False)
    with pytest.raises(CheckpointError, match="sha256"):
        load_version(vdir)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    card = make_version(tmp_path)
    vdir = tmp_path / card.version
    state = build_model("alexnet", num_classes=11).state_dict()  # fc8 has 11 rows, not 10
    _rewrite_weights(vdir, st_save({k: v.contiguous() for k, v in state.items()}))
    with pytest.raises(CheckpointError, match=r"classifier\.6\.weight has shape \(11, 4096\)"):
        load_version(vdir)


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    card = make_version(tmp_path)
    vdir = tmp_path / card.version
    state = build_model("alexnet", num_classes=10).state_dict()
    state["features.0.bias"][3] = float("nan")
    _rewrite_weights(vdir, st_save({k: v.contiguous() for k, v in state.items()}))
    with pytest.raises(CheckpointError, match="NaN"):
        load_version(vdir)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fix_sha", [True, False])
def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(
    tmp_path: Path, fix_sha: bool
) -> None:
    card = make_version(tmp_path / "models")
    vdir = tmp_path / "models" / card.version
    marker = tmp_path / "pwned"
    _rewrite_weights(vdir, pickle.dumps({"features.0.weight": _Exploit(marker)}), fix_sha=fix_sha)
    with pytest.raises(CheckpointError, match="safetensors" if fix_sha else "sha256"):
        load_version(vdir)
    assert not marker.exists()


def test_metadata_errors_name_the_problem(tmp_path: Path) -> None:
    card = make_version(tmp_path)
    path = tmp_path / card.version / C.CARD_FILE
    original = json.loads(path.read_text())
    for change, match in [
        ({"format_version": 99}, "format_version 99 is not supported"),
        ({"labels": ["just one"]}, "1 labels for num_classes=10"),
        ({"arch": "resnet"}, "unknown arch"),
    ]:
        path.write_text(json.dumps({**original, **change}))
        with pytest.raises(CheckpointError, match=match):
            load_version(tmp_path / card.version)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable JSON"):
        load_version(tmp_path / card.version)


def test_crash_mid_save_leaves_the_previous_version_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_version(tmp_path, activate=True)
    real_write = files.write_file_durably

    def crash_after_half(path: Path, data: bytes) -> None:
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(files, "write_file_durably", crash_after_half)
    with pytest.raises(KeyboardInterrupt):
        make_version(tmp_path, seed=1)
    monkeypatch.setattr(files, "write_file_durably", real_write)
    assert [c.version for c in C.list_cards(tmp_path)] == [first.version]
    assert C.read_active(tmp_path) == first.version
    load_version(tmp_path / first.version)


def test_a_hard_kill_mid_save_leaves_only_a_hidden_temp_folder(tmp_path: Path) -> None:
    first = make_version(tmp_path)
    leftover = tmp_path / ".tmp-20990101-000000-dead.1234"
    leftover.mkdir()
    (leftover / C.WEIGHTS_FILE).write_bytes(b"half a file")
    assert [c.version for c in C.list_cards(tmp_path)] == [first.version]
    assert files.remove_partial_saves(tmp_path) == 1
    assert not leftover.exists()


def test_active_pointer_is_replaced_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_version(tmp_path, activate=True)
    b = make_version(tmp_path, seed=1)

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "replace", boom)
    with pytest.raises(OSError):
        C.write_active(tmp_path, b.version)
    monkeypatch.undo()
    assert C.read_active(tmp_path) == a.version
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    C.write_active(tmp_path, b.version)
    assert C.read_active(tmp_path) == b.version


def test_activating_a_missing_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model version"):
        C.write_active(tmp_path, "nope")
    with pytest.raises(CheckpointError, match="invalid version name"):
        C.write_active(tmp_path, "../etc")


def test_resolve_version_by_name_active_or_path(tmp_path: Path) -> None:
    card = make_version(tmp_path, activate=True)
    assert C.resolve_version_dir(tmp_path, card.version) == tmp_path / card.version
    assert C.resolve_version_dir(tmp_path, "active") == tmp_path / card.version
    assert C.resolve_version_dir(tmp_path, str(tmp_path / card.version)) == tmp_path / card.version
    with pytest.raises(CheckpointError, match="unknown model version"):
        C.resolve_version_dir(tmp_path, "missing")
