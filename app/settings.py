"""Service and CLI settings: environment variables prefixed `ALEXNET_`, or a `.env` file."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a
    container's `--cpus`, a Kubernetes CPU limit), where `os.cpu_count()` says the host's."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))  # ceil: 1.5 CPUs -> 2 threads
    except (OSError, ValueError):
        pass
    return max(1, n)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ALEXNET_", env_file=".env", extra="ignore", frozen=True
    )

    # Where to listen. 127.0.0.1 by default: exposing the service is a deliberate choice.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # State: models/, data/, jobs/, alexnet.db.
    home: Path = Path("var")

    # Inference placement; `auto` picks CUDA > MPS > CPU and bf16 where it is fast (and
    # int8 where a guard-passing int8 program of the version that measured faster than
    # fp32 is already cached).
    # int8: CPU only, needs the `int8` extra (torchao); its compiled programs are cached
    # under $ALEXNET_HOME/cache/int8/ (model/quantize.py).
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    # torch.compile: off by default (it measured +1-4% for AlexNet on an AVX-512 CPU, and
    # costs ~10 s of start per batch size); `auto` measures compiled against eager at the
    # first load on this machine and keeps the faster (the decision is cached).
    compile: bool | Literal["auto"] = False
    # A reduced precision (bf16, fp16, int8) is served only when its top-1 answers agree
    # with fp32's on at least this share of the load-time check's images (app/registry.py).
    min_agreement: float = Field(0.99, ge=0.5, le=1)
    channels_last: bool = True

    # Micro-batching.
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    max_queue: int = Field(256, ge=1)
    # Also refuse when the queue would take longer than this to drain at the measured
    # model rate (0: off): bounds the latency of accepted requests under overload.
    max_queue_wait_s: float = Field(1.0, ge=0, le=600)
    request_timeout_s: float = Field(10.0, gt=0)
    # Slow clients: request headers must arrive within this, a request body within
    # body_timeout_s of its first byte (408 request_timeout), so trickling clients
    # (slowloris) cannot hold connections.
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    # A client that stops reading while its answers fill the send buffer has this long to
    # read some before the connection is dropped.
    write_timeout_s: float = Field(30.0, gt=0, le=3600)
    # A request's head (request line and headers) is at most this many bytes (431), and at
    # most this many connections may be sending one at once (429 to the next): together
    # they bound the memory that unfinished headers can take (64 MiB by default).
    max_header_bytes: int = Field(64 * 1024, ge=4096, le=16 * 1024 * 1024)
    max_header_connections: int = Field(1024, ge=1, le=1_000_000)
    decode_threads: int = Field(0, ge=0)  # 0: one per CPU core
    # Every this many seconds, hand the C allocator's free pages back to the OS
    # (malloc_trim; app/memory.py). 0: leave the allocator as it is (no trim, and glibc's
    # own number of arenas).
    memory_trim_s: float = Field(5.0, ge=0, le=3600)

    # Upload limits.
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # per image file
    max_image_pixels: int = Field(40_000_000, ge=1, le=89_478_485)  # <= Pillow's own bound
    max_image_side: int = Field(20_000, ge=64)
    max_files: int = Field(32, ge=1, le=256)
    # Upload bytes being received at once, all connections together (memory and temp disk):
    # past it new uploads get 429 with Retry-After (0: no budget). One request is always
    # admitted when nothing else is in flight, however large its body may be.
    max_upload_bytes_in_flight: int = Field(256 * 1024 * 1024, ge=0)

    # Datasets (POST /admin/datasets/{name}, `alexnet datasets import`): the archive, and
    # everything unpacked from it, at most this many bytes; at most this many members; each
    # image within max_upload_bytes. The frozen holdout: this share of each class.
    max_dataset_bytes: int = Field(2 * 1024**3, ge=1024)
    max_dataset_files: int = Field(50_000, ge=1, le=10_000_000)
    dataset_upload_timeout_s: float = Field(1800.0, gt=0, le=86_400)
    holdout_split: float = Field(0.15, gt=0, le=0.5)
    # if_better: a candidate replaces the served version only when it is better on the
    # holdout by more than chance (McNemar's exact test at this level).
    promotion_alpha: float = Field(0.05, gt=0, le=1)

    # Feedback (POST /v1/feedback): off by default, because it keeps what users upload.
    # On: each accepted upload's bytes are kept (content-addressed, under
    # $ALEXNET_HOME/feedback/) with its answer, within feedback_max_bytes; unlabelled ones
    # go after feedback_retention_days (and oldest first past the byte budget); labelled
    # ones stay until deleted. At most feedback_queue answers wait for the writer (the
    # rest are not kept, and counted). feedback_token: a bearer token POST /v1/feedback
    # needs (unset: none; it is not the admin token, end users send it).
    feedback: bool = False
    feedback_max_bytes: int = Field(1024**3, ge=1024)
    feedback_retention_days: float = Field(30.0, gt=0, le=36_500)
    feedback_queue: int = Field(1024, ge=1, le=1_000_000)
    feedback_token: SecretStr | None = None

    # "Not sure" answers: an answer whose top-1 probability is below min_confidence carries
    # "uncertain": true (None: off; a request's min_confidence query parameter overrides
    # it). drift_window: how many recent answers per version the drift gauges look at.
    min_confidence: float | None = Field(None, gt=0, le=1)
    drift_window: int = Field(1000, ge=10, le=1_000_000)

    # Tracking (model/tracking.py), for `alexnet train` and admin jobs alike (a job's
    # process inherits these): every run an MLflow run on mlflow_tracking_uri, in
    # mlflow_experiment (None: the dataset's name); at a run's end it waits at most
    # mlflow_timeout_s for the server. tensorboard: event files in each run folder.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None
    mlflow_timeout_s: float = Field(30.0, gt=0, le=3600)
    tensorboard: bool = False

    admin_token: SecretStr | None = None
    # Training jobs: one at a time, niced, with capped threads so serving keeps its share.
    job_threads: int = Field(0, ge=0, le=1024)  # 0: all cores but one (at least one)
    job_nice: int = Field(10, ge=0, le=19)
    max_queued_jobs: int = Field(8, ge=1, le=10_000)
    # Finished jobs' run state (state.safetensors + best.safetensors, ~650 MB at 224 px): a
    # succeeded job's is deleted (that run can never continue); the newest N failed jobs
    # keep theirs (for `alexnet train --resume` by hand); -1 keeps every one. Interrupted
    # and cancelled jobs keep theirs: they can resume.
    keep_job_state: int = Field(1, ge=-1, le=100_000)
    # Several replicas sharing one ALEXNET_HOME: exactly one runs jobs. Every server
    # follows ACTIVE on disk every `watch_active_s` seconds (0: off), so what another
    # replica or `alexnet models activate` makes active is served (a read of a small file).
    run_jobs: bool = True
    watch_active_s: float = Field(2.0, ge=0, le=3600)
    # The model's name in the Open Inference Protocol (/v2/models/{name}).
    model_name: str = Field("alexnet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # Serve this one version folder (weights + model.json), read-only: no registry, no
    # ACTIVE, no jobs, no bootstrap (KServe's storage initializer puts it at /mnt/models).
    model_dir: Path | None = None
    bootstrap: Literal["auto", "imagenet", "synthetic", "none"] = "auto"
    # The embedded default's training job (when ImageNet weights are unavailable): more
    # images or epochs buy accuracy with first-start time.
    bootstrap_dataset: str = Field("synthetic", pattern=r"^synthetic(:[0-9]{2,7})?$")
    bootstrap_epochs: int = Field(0, ge=0, le=1000)  # 0: the built-in recipe's
    shutdown_timeout_s: float = Field(8.0, ge=0)  # below Docker's 10 s stop grace
    cors_origins: list[str] = Field(default_factory=list)
    # Host names this server answers to (JSON list; `*.example.com` for subdomains); empty:
    # any. Set it on a server a browser can reach under a name (DNS rebinding).
    allowed_hosts: list[str] = Field(default_factory=list)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's
    # forwarded_allow_ips: comma-separated addresses or networks, `*` for any); empty:
    # none, the client's own address is used.
    forwarded_allow_ips: str = ""
    log_level: str = "info"

    @cached_property
    def effective_job_threads(self) -> int:
        return self.job_threads or max(1, available_cpus() - 1)

    @cached_property
    def models_dir(self) -> Path:
        return self.home / "models"

    @cached_property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @cached_property
    def data_dir(self) -> Path:
        return self.home / "data"

    @cached_property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @cached_property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @cached_property
    def feedback_dir(self) -> Path:
        return self.home / "feedback"

    @cached_property
    def db_path(self) -> Path:
        return self.home / "alexnet.db"
