"""The route paths something outside their router needs to know (the body limits, the
in-flight upload budget, admin authentication before the body), named once."""

from __future__ import annotations

from typing import Final

API_PREFIX: Final = "/v1"
ADMIN_PREFIX: Final = "/admin"
MODELS: Final = API_PREFIX + "/models"
CLASSIFY: Final = API_PREFIX + "/classify"
CLASSIFY_BATCH: Final = API_PREFIX + "/classify/batch"
FEEDBACK: Final = API_PREFIX + "/feedback"
UPLOADS: Final = frozenset({CLASSIFY, CLASSIFY_BATCH})
DATASETS: Final = ADMIN_PREFIX + "/datasets"
OIP_PREFIX: Final = "/v2"  # the Open Inference Protocol (KServe V2): its own error shape


def is_oip(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def is_infer(path: str) -> bool:
    """POST /v2/models/{name}[/versions/{version}]/infer: tensors or image files."""
    return is_oip(path) and path.endswith("/infer")


def is_upload(path: str) -> bool:
    """The requests whose bodies count against the in-flight upload budget."""
    return path in UPLOADS or is_infer(path)


def is_dataset_upload(path: str) -> bool:
    """POST /admin/datasets/{name}: an archive, with its own body limit and deadline."""
    return path.startswith(DATASETS + "/") and "/" not in path[len(DATASETS) + 1 :]
