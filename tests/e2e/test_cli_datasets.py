"""`alexnet datasets` as a real subprocess on a real home: the same store and checks as
/admin/datasets (a folder or an archive in, list, show, delete; one clear line on error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.jobs.store import JobStore
from app.schemas import JobRequest
from tests.helpers.cli import run_cli
from tests.helpers.datasets import shape_images, write_tree, zip_bytes

pytestmark = pytest.mark.e2e


def test_import_list_show_delete(home: Path, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", shape_images(2, 10) | {"circle/notes.txt": b"x"})
    r = run_cli("datasets", "import", str(src), "--name", "shapes", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("shapes: 2 classes, 20 images"), r.stdout
    assert "holdout: 4 images (drawn, 15% of each class)" in r.stdout
    assert "circle/notes.txt: not an image" in r.stdout
    assert "alexnet train --dataset imagefolder:shapes --base active" in r.stdout
    archive = tmp_path / "more.zip"
    archive.write_bytes(zip_bytes(shape_images(3, 4, prefix="more/")))
    r = run_cli("datasets", "import", str(archive), "--name", "more", "--json", home=home)
    assert r.returncode == 0, r.stderr
    more = json.loads(r.stdout)
    assert more["num_classes"] == 3 and more["source"] == "file more.zip"

    r = run_cli("datasets", "list", "--json", home=home)
    listed = {d["name"]: d for d in json.loads(r.stdout)["datasets"]}
    assert set(listed) == {"shapes", "more"} and listed["more"]["hash"] == more["hash"]
    r = run_cli("datasets", "show", "shapes", "--json", home=home)
    shown = json.loads(r.stdout)
    assert shown["skipped"] == [
        {"path": "circle/notes.txt", "reason": shown["skipped"][0]["reason"]}
    ]

    # --replace swaps in the new contents (the name taken without it: the API suite)
    archive.write_bytes(zip_bytes(shape_images(2, 5, prefix="more/")))
    r = run_cli("datasets", "import", str(archive), "--name", "more", "--replace", "--json",
                home=home)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["num_classes"] == 2, r.stderr
    # One clear line for each error: a bad archive, a dataset in use
    bad = tmp_path / "bad.zip"
    bad.write_bytes(zip_bytes({**shape_images(2, 2), "../x.png": b"x"}))
    r = run_cli("datasets", "import", str(bad), "--name", "bad", home=home)
    assert r.returncode == 1 and "leaves the dataset" in r.stderr, r.stderr
    store = JobStore(home / "alexnet.db")
    job = store.create(JobRequest(dataset="imagefolder:more"))
    r = run_cli("datasets", "delete", "more", home=home)
    assert r.returncode == 1 and job.id in r.stderr, r.stderr
    store.update(job.id, status="cancelled")
    store.close()
    r = run_cli("datasets", "delete", "more", home=home)
    assert r.returncode == 0 and r.stdout.startswith("deleted dataset more"), r.stderr
    r = run_cli("datasets", home=home)  # list, the default
    assert "shapes" in r.stdout and "more" not in r.stdout
    r = run_cli("datasets", "show", "shapes", home=home)
    assert r.returncode == 0 and r.stdout.startswith("shapes: 2 classes, 20 images"), r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[2:4]}
    assert rows == {"circle": ["2", "8"], "triangle": ["2", "8"]}  # HOLDOUT, TRAINVAL
    assert "skipped 1 file(s):" in r.stdout
    assert not list((home / "data").glob(".tmp-*"))
