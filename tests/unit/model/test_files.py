"""model/files.py: partial saves name their writer, and cleanups spare live writers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from model import files


def test_partial_saves_name_their_writer_and_cleanups_can_spare_live_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "_writer_tag", "")
    files.set_writer_tag("job-abc")  # what `alexnet train --writer-tag job-abc` does
    name = files.tmp_name("v1")
    assert name.startswith(".tmp-v1.job-abc.")
    files.set_writer_tag("")
    assert f".p{os.getpid()}." in files.tmp_name("v1")
    dead, live = tmp_path / name, tmp_path / files.tmp_name("v2")
    dead.mkdir()
    live.mkdir()
    assert files.remove_partial_saves(tmp_path, older_than_s=600) == 0  # both just written
    assert files.remove_partial_saves(tmp_path, writer="job-abc") == 1
    assert not dead.exists() and live.exists()
    old = time.time() - 3600
    os.utime(live, (old, old))
    assert files.remove_partial_saves(tmp_path, older_than_s=600) == 1
