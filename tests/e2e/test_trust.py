"""How far to trust an answer, end to end: a job's version carries its calibration and
probes, the served probabilities are the CLI's, a version whose probes no longer match is
refused with its reason, a precision that fails them is served in fp32, "not sure"
answers and the drift gauges, `alexnet calibrate`, and the alert rules (promtool)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.cli import REPO, run_cli
from tests.helpers.jobs import SMALL, TOKEN, api, finished, wait_job
from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e

ENV = {"ALEXNET_ADMIN_TOKEN": TOKEN, "ALEXNET_JOB_THREADS": "1", "ALEXNET_PRECISION": "fp32",
       "ALEXNET_DRIFT_WINDOW": "50"}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, Any]]]:
    """A server (fp32, so the CLI's numbers are comparable bit for bit) that has trained
    and activated one version."""
    home = tmp_path_factory.mktemp("trust")
    make_version(home / "models", activate=True)
    with Server(home, **ENV) as srv:
        job = api(srv, "POST", "/admin/jobs", json={**SMALL, "workers": 0}).json()
        done = wait_job(srv, job["id"], finished)
        assert done["status"] == "succeeded", done
        yield srv, done


def _active(srv: Server) -> dict[str, Any]:
    info: dict[str, Any] = httpx.get(srv.url + "/v1/models/active", timeout=30).json()
    return info


def test_a_jobs_version_carries_calibration_probes_and_its_diagram(
    trained: tuple[Server, dict[str, Any]],
) -> None:
    srv, done = trained
    info = _active(srv)
    assert info["version"] == done["result_version"] and info["calibrated"] is True
    cal = info["calibration"]
    assert cal["bins"] == 15 and cal["n"] == 32 and cal["measured_on"] == "holdout"  # 160 // 5
    assert cal["temperature"] > 0 and cal["fitted_on"] == "val"
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(cal)
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9  # T minimises the NLL on val...
    assert len(info["probes"]) == 8 and len(info["label_distribution"]) == 10
    parity = info["precision_check"]["parity"]["fp32"]
    assert parity["passed"] is True and parity["probes"] == 8
    png = httpx.get(f"{srv.url}/v1/models/{info['version']}/reliability.png", timeout=30)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert png.headers["content-type"] == "image/png"
    listed = httpx.get(srv.url + "/v1/models", timeout=30).json()["versions"]
    assert {v["version"]: v["calibrated"] for v in listed}[info["version"]] is True
    # the version served before (made without calibration) says so
    other = next(v["version"] for v in listed if not v["calibrated"])
    r = httpx.get(f"{srv.url}/v1/models/{other}/reliability.png", timeout=30)
    assert r.status_code == 404 and "alexnet calibrate" in r.json()["error"]["message"]
    assert httpx.get(f"{srv.url}/v1/models/nope/reliability.png", timeout=30).status_code == 404


def test_the_served_probabilities_are_the_clis(trained: tuple[Server, dict[str, Any]]) -> None:
    srv, _ = trained
    info = _active(srv)
    folder = srv.home / "models" / info["version"]
    files = [folder / p["file"] for p in info["probes"]]
    cli = run_cli("predict", info["version"], *map(str, files), "--json", "--top-k", "10",
                  home=srv.home, env={"ALEXNET_PRECISION": "fp32"})  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    by_cli = [r["predictions"] for r in json.loads(cli.stdout)]  # in the order given
    for f, probe, cli_rows in zip(files, info["probes"], by_cli, strict=True):
        r = httpx.post(srv.url + "/v1/classify", params={"top_k": 10},
                       files={"file": (f.name, f.read_bytes())}, timeout=30)  # fmt: skip
        served = r.json()["predictions"]
        assert served[0]["index"] == cli_rows[0]["index"]
        cli_p = {p["index"]: p["probability"] for p in cli_rows}
        for p in served:
            assert p["probability"] == pytest.approx(cli_p[p["index"]], abs=1e-5)
        # ...and what training computed for the probe (with its temperature)
        expected = {t["index"]: t["probability"] for t in probe["top5"]}
        got = {p["index"]: p["probability"] for p in served}
        assert all(got[i] == pytest.approx(v, abs=1e-4) for i, v in expected.items())


def test_not_sure_answers_and_the_drift_gauges(
    trained: tuple[Server, dict[str, Any]], jpeg_photos: list[Path]
) -> None:
    srv, _ = trained
    version = _active(srv)["version"]
    photo = jpeg_photos[0].read_bytes()

    def ask(**params: Any) -> httpx.Response:
        return httpx.post(srv.url + "/v1/classify", params=params,
                          files={"file": ("a.jpg", photo)}, timeout=30)  # fmt: skip

    sure = ask(min_confidence=1e-6).json()
    assert sure["uncertain"] is False and sure["min_confidence"] == 1e-6
    top1 = sure["predictions"][0]["probability"]
    unsure = ask(min_confidence=1.0).json()  # every top-1 below 1 is "not sure"
    assert unsure["uncertain"] is True and unsure["predictions"][0]["probability"] == top1
    plain = ask().json()  # ALEXNET_MIN_CONFIDENCE unset: off
    assert plain["uncertain"] is False and plain["min_confidence"] is None
    for bad in (0, 1.5, "x"):
        r = ask(min_confidence=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    batch = httpx.post(srv.url + "/v1/classify/batch", params={"min_confidence": 1.0},
                       files=[("files", ("a.jpg", photo)), ("files", ("b.txt", b"no"))],
                       timeout=30).json()  # fmt: skip
    assert batch["min_confidence"] == 1.0
    assert batch["results"][0]["uncertain"] is True and "uncertain" not in batch["results"][1]
    metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    assert f'alexnet_uncertain_total{{version="{version}"}} 2.0' in metrics
    assert f'alexnet_top1_probability_count{{version="{version}"}}' in metrics
    assert f'alexnet_label_drift_jsd{{version="{version}"}}' in metrics
    assert f'alexnet_uncertain_ratio{{version="{version}"}}' in metrics


def _copy_version(models: Path, version: str, name: str, **edits: Any) -> str:
    shutil.copytree(models / version, models / name)
    doc = json.loads((models / name / "model.json").read_text())
    doc.update(version=name, **edits)
    (models / name / "model.json").write_text(json.dumps(doc))
    return name


def test_a_version_whose_probes_no_longer_match_is_refused_with_its_reason(
    trained: tuple[Server, dict[str, Any]],
) -> None:
    srv, _ = trained
    served = _active(srv)["version"]
    models = srv.home / "models"
    # another mean than training used: the version's files are intact, its serving is not
    name = _copy_version(models, served, "edited-mean", mean=[0.2, 0.2, 0.2])
    r = api(srv, "POST", f"/admin/models/{name}/activate")
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "refused" in message and "probe probes/" in message and "writer" in message
    assert _active(srv)["version"] == served  # nothing changed for the users


def test_calibrate_a_version_from_the_command_line(trained: tuple[Server, dict[str, Any]]) -> None:
    srv, done = trained
    old = {"version": done["result_version"]}  # a version can be calibrated again, on any data
    r = run_cli("calibrate", old["version"], "--dataset", "synthetic:160", "--json",
                home=srv.home, env={"ALEXNET_PRECISION": "fp32"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["parent"] == old["version"] and out["calibration"]["dataset"] == "synthetic:160"
    card = json.loads((srv.home / "models" / out["version"] / "model.json").read_text())
    assert card["source"] == "calibration" and card["probes"] and card["calibration"]["n"] == 32
    first = json.loads((srv.home / "models" / old["version"] / "model.json").read_text())
    assert card["sha256"] == first["sha256"]  # the same weights
    act = api(srv, "POST", f"/admin/models/{out['version']}/activate")
    assert act.status_code == 200, act.text
    assert act.json()["model"]["calibrated"] is True
    bad = run_cli("calibrate", old["version"], "--dataset", "imagefolder:none", home=srv.home)
    assert bad.returncode == 1 and "alexnet: error:" in bad.stderr


def test_a_precision_that_fails_the_probes_is_served_in_fp32(tmp_path: Path) -> None:
    card = make_version(tmp_path / "models", activate=True, probes=True, bf16_fragile=True)
    with Server(tmp_path, ALEXNET_PRECISION="bf16") as srv:
        info = _active(srv)
        assert info["version"] == card.version and info["precision"] == "fp32"
        check = info["precision_check"]
        assert check["requested"] == "bf16" and check["parity"]["bf16"]["passed"] is False
        assert check["fallback"].startswith("bf16 fails the probes: probe probes/")
        assert "serving fp32" in srv.log.read_text()


def test_the_alert_rules_pass_promtool_and_name_real_metrics(
    trained: tuple[Server, dict[str, Any]],
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's prometheus (promtool) is not installed (.ci/run installs it)")
    rules = REPO / "deploy" / "prometheus" / "alerts.yml"
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
    # every alexnet_ series the rules use is one the service exports
    import re

    srv, _ = trained
    httpx.post(srv.url + "/v1/classify", files={"file": ("x.png", b"not an image")}, timeout=30)
    exported = set(re.findall(r"^(alexnet_[a-z0-9_]+)", httpx.get(srv.url + "/metrics", timeout=30).text, re.M))  # fmt: skip
    used = set(re.findall(r"\b(alexnet_[a-z0-9_]+)", rules.read_text()))
    assert used and used <= exported, used - exported
