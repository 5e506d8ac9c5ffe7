"""`alexnet export` as a real subprocess: an ONNX file checked on real photos, its report
(text and --json), and one clear line and exit 1 without the export extra (pt2 works
without it)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from app import cli_export
from model import export
from tests.helpers.cli import run_cli
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e

HINT = "pip install 'alexnet-service[export]'"


def test_the_cli_offers_the_core_formats() -> None:
    assert cli_export.FORMATS == export.FORMATS


def test_export_onnx_of_the_active_version(home: Path, tmp_path: Path, photo_dir: Path) -> None:
    card = make_version(home / "models", probes=True, activate=True)
    out = tmp_path / "exports"  # created by the command
    r = run_cli("export", "active", "--format", "onnx", "--output", str(out),
                "--check-images", str(photo_dir), "--json", home=home)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no exporter chatter
    doc = json.loads(r.stdout)
    photos = len(list(photo_dir.iterdir()))  # every JPEG and PNG
    assert doc["format"] == "onnx" and doc["version"] == card.version
    assert doc["path"] == str(out / f"{card.version}.onnx") and doc["opset"] >= 18
    assert doc["check"]["runtime"] == "onnxruntime" and doc["check"]["passed"]
    assert doc["check"]["images"] == photos and doc["check"]["batch_sizes"] == [photos, 1]
    assert doc["check"]["max_difference"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == [f"{card.version}.onnx"]
    session = ort.InferenceSession(doc["path"], providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["alexnet.version"] == card.version

    r = run_cli("export", card.version, "--format", "onnx", "--output", str(out), home=home)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"alexnet: error: {out / card.version}.onnx already exists "
                        "(--force replaces it)\n")  # fmt: skip
    r = run_cli("export", card.version, "--format", "onnx", "--name", "x", home=home)
    assert (r.returncode, r.stderr) == (1, "alexnet: error: --name is for --format triton\n")


def test_without_the_export_extra(home: Path, tmp_path: Path) -> None:
    """onnx, onnxscript and onnxruntime shadowed by modules that fail to import, as when
    the extra is not installed; pt2 needs torch only and still works."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("onnx", "onnxscript", "onnxruntime"):
        (stubs / f"{name}.py").write_text(f'raise ImportError("No module named {name}")\n')
    env = {"PYTHONPATH": str(stubs)}
    card = make_version(home / "models", probes=True)
    out = tmp_path / "out"
    r = run_cli("export", card.version, "--format", "onnx", "--output", str(out), home=home,
                env=env)  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("alexnet: error: alexnet export --format onnx needs the export extra: "
                        f"{HINT} (cannot import onnx, onnxscript, onnxruntime)\n")  # fmt: skip
    assert not out.exists()  # refused before anything was made

    r = run_cli("export", card.version, "--format", "pt2", "--output", str(out), home=home,
                env=env)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"exported {card.version} as a torch.export program: "
                               f"{out / card.version}.pt2 (")  # fmt: skip
    assert lines[1].startswith("  checked with torch.export against our fp32 model on 8 images "
                               "(the version's probe images; batches of 8, 1): max probability "
                               "difference ")  # fmt: skip
    assert lines[1].endswith("(tolerance 1e-04)") and len(lines) == 2
    assert sorted(p.name for p in out.iterdir()) == [f"{card.version}.pt2"]
