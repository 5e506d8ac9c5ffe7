"""The CLI and a running server on the same ALEXNET_HOME agree: `alexnet models activate`
reaches the server, and says so."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from app.presence import announce, withdraw
from tests.helpers.cli import run_cli
from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = pytest.mark.e2e


def test_cli_activate_reaches_the_running_server(home: Path) -> None:
    first = make_version(home / "models", activate=True)
    second = make_version(home / "models", seed=1)
    with Server(home) as srv:
        assert httpx.get(srv.url + "/v1/models").json()["serving"] == first.version
        r = run_cli("models", "activate", second.version, home=home)
        assert r.returncode == 0, r.stderr
        assert f"active version: {second.version}" in r.stdout
        assert f"(pid {srv.proc.pid}) follows ACTIVE" in r.stdout, r.stdout  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        listed: dict[str, object] = {}
        while time.monotonic() < deadline:
            listed = httpx.get(srv.url + "/v1/models").json()
            if listed["serving"] == second.version:
                break
            time.sleep(0.2)
        assert listed["active"] == listed["serving"] == second.version, listed
    # Once the server has stopped, the CLI no longer speaks of it.
    r = run_cli("models", "activate", first.version, "--json", home=home)
    assert r.returncode == 0 and json.loads(r.stdout) == {"active": first.version, "servers": []}


def test_cli_activate_warns_when_the_server_does_not_follow(home: Path) -> None:
    first = make_version(home / "models", activate=True)
    # This test process stands in for a server started with ALEXNET_WATCH_ACTIVE_S=0.
    record = announce(home, watch_active_s=0)
    try:
        r = run_cli("models", "activate", first.version, home=home)
    finally:
        withdraw(record)
    assert r.returncode == 0, r.stderr
    assert "does not follow ACTIVE (ALEXNET_WATCH_ACTIVE_S=0)" in r.stdout, r.stdout
    assert f"POST /admin/models/{first.version}/activate" in r.stdout
