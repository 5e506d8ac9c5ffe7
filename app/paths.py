"""The routes whose path something outside their router needs to know (the body limits,
the in-flight upload budget), named once."""

from __future__ import annotations

from typing import Final

API_PREFIX: Final = "/v1"
CLASSIFY: Final = API_PREFIX + "/classify"
CLASSIFY_BATCH: Final = API_PREFIX + "/classify/batch"
UPLOADS: Final = frozenset({CLASSIFY, CLASSIFY_BATCH})
