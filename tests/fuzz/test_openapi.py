"""Property-based API tests: schemathesis generates requests from the service's own OpenAPI
schema and sends them to a real server. No route may answer 5xx, and every response must
match its documented status codes, content type, headers and body schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.core.parameters import ParameterLocation

from app.main import create_app
from app.settings import Settings
from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "fuzz-admin-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("home")
    make_version(home / "models", activate=True, metrics={"val_top1": 0.5})
    # Jobs are recorded but never run here (ALEXNET_RUN_JOBS=false): random job configs
    # must not start hours of training.
    srv = Server(home, ALEXNET_ADMIN_TOKEN=TOKEN, ALEXNET_RUN_JOBS="false", ALEXNET_FEEDBACK="true",
                 ALEXNET_MAX_UPLOAD_BYTES="200000", ALEXNET_MAX_FILES="4").start()  # fmt: skip
    try:
        yield srv
    finally:
        srv.terminate()
        srv.__exit__(None, None, None)


# The schema the server publishes, built the same way (no server needed to collect tests).
RAW = create_app(Settings(home=Path("/nonexistent"), admin_token=TOKEN)).openapi()
schema = schemathesis.openapi.from_dict(RAW)


@schema.parametrize()
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
def test_every_route_keeps_its_contract(case: schemathesis.Case, server: Server) -> None:
    # Every check but "schema-valid data is accepted": valid-looking requests are rightly
    # refused for reasons a schema cannot express (top_k above this model's class count,
    # uploaded bytes that are not an image, an imagefolder that does not exist, a job id
    # or version that is not there). Those answers are still checked against the schema.
    # A 413 is a rejection too: the body limit refuses an oversized body (generated invalid
    # data is often long), and a batch of too many files, before anything parses it, so
    # the schema's 422 never comes.
    # The admin token goes on every request, except where schemathesis generated the headers
    # as invalid on purpose (the bearer header missing or mangled): adding it then would turn
    # its negative case into a valid request, and a 200 to it would read as a failure.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        headers = {}
    response = case.call(base_url=server.url, timeout=30, headers=headers)
    excluded = [positive_data_acceptance]
    if response.status_code == 413:
        error = response.json()["error"]
        if case.path.startswith("/v2"):  # the Open Inference Protocol's {"error": message}
            assert isinstance(error, str) and error
        else:
            assert error["code"] in ("payload_too_large", "too_many_files")
        excluded.append(negative_data_rejection)
    case.validate_response(response, excluded_checks=excluded)


def test_the_served_schema_is_the_tested_one(server: Server) -> None:
    assert httpx.get(server.url + "/openapi.json").json() == RAW


def test_schema_documents_the_error_codes() -> None:
    classify = RAW["paths"]["/v1/classify"]["post"]["responses"]
    assert {"400", "413", "415", "422", "429", "503", "504"} <= set(classify)
    assert {"401", "503"} <= set(RAW["paths"]["/admin/jobs"]["get"]["responses"])
