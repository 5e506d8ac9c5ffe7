"""Datasets as the service and the CLI see them: the store built from the settings, the
jobs that use a dataset (no deletion or replacement under a queued or running job). (No
HTTP here: the CLI imports it.)"""

from __future__ import annotations

from app.jobs.store import JobStore
from app.settings import Settings
from model.datasets import DatasetImportError, DatasetStore, ImportLimits
from model.images import DecodeLimits


def dataset_store(s: Settings) -> DatasetStore:
    limits = ImportLimits(
        max_bytes=s.max_dataset_bytes, max_files=s.max_dataset_files,
        max_file_bytes=s.max_upload_bytes,
        decode=DecodeLimits(max_pixels=s.max_image_pixels, max_side=s.max_image_side),
    )  # fmt: skip
    return DatasetStore(s.data_dir, limits, s.holdout_split)


def jobs_using(jobs: JobStore, name: str) -> list[str]:
    """Queued and running jobs that read dataset `name`."""
    spec = f"imagefolder:{name}"
    return [j.id for status in ("queued", "running")
            for j in jobs.list(status=status, limit=10_000) if j.config.get("dataset") == spec]  # fmt: skip


def check_not_in_use(jobs: JobStore, name: str, doing: str) -> None:
    using = jobs_using(jobs, name)
    if using:
        raise DatasetImportError(
            "busy", f"cannot {doing} dataset {name!r}: job(s) {', '.join(using)} use it "
            "(cancel them, or wait until they finish)",
        )  # fmt: skip
