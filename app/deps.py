"""The request dependencies, in one place: the service's state, the admin token (and the
refusal of a read-only server's admin API), and the check of every route's query string."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ReadOnly, ValidationFailed, clip
from app.middleware import check_admin_token
from app.state import AppState


async def get_state(request: Request) -> AppState:
    """async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request
    (bench/cpu_profile.py found it on every classify call)."""
    state: AppState = request.app.state.alexnet
    return state


StateDep = Annotated[AppState, Depends(get_state)]


bearer = HTTPBearer(
    auto_error=False,
    description="The value of ALEXNET_ADMIN_TOKEN (admin routes answer 503 admin_disabled "
    "while it is unset)",
)


async def require_admin(
    state: StateDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Declares the scheme in OpenAPI, and checks again: AdminAuthMiddleware has already
    refused unauthenticated requests before their bodies were read."""
    given = f"Bearer {creds.credentials}" if creds is not None else None
    check_admin_token(state.settings.admin_token, given)
    folder = state.settings.model_dir
    if folder is not None:  # (after the token: a stranger learns nothing about the server)
        raise ReadOnly(
            f"this server serves the version folder {folder} read-only (ALEXNET_MODEL_DIR): "
            "it has no jobs, datasets, feedback or other versions to administer; train, "
            "import and activate versions on a server with an ALEXNET_HOME",
            details={"model_dir": str(folder)},
        )


AdminDep = Depends(require_admin)


def _query_names(dep: Dependant) -> set[str]:
    names = {p.alias for p in dep.query_params}
    for sub in dep.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """422 for query parameters a route does not declare (`?topk=3` is a typo to report,
    not a request to answer with the default top 5) and for one given twice."""
    if not request.scope.get("query_string"):
        return  # the usual case: nothing to check
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema:
        return
    declared = _query_names(route.dependant)
    counts = Counter(k for k, _ in request.query_params.multi_items())
    repeated = sorted(k for k, n in counts.items() if n > 1 and k in declared)
    if repeated:  # every parameter here is a scalar: `?top_k=1&top_k=2` is ambiguous
        raise ValidationFailed(
            f"query parameter(s) given more than once: {', '.join(repeated)}",
            details=[{"loc": ["query", r], "msg": "given more than once"} for r in repeated],
        )
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        raise ValidationFailed(
            f"unknown query parameter(s): {clip(', '.join(unknown))}"
            + (f" (accepted: {', '.join(sorted(declared))})" if declared else ""),
            details=[
                {"loc": ["query", clip(u, 100)], "msg": "not a parameter of this route"}
                for u in unknown
            ],
        )
