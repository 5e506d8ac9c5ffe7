"""The Open Inference Protocol before a model is served: 503 with Retry-After, in the
protocol's {"error": message}, and live all the same."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.api import make_client


def test_not_ready_is_503_with_retry_after_in_the_protocols_shape(tmp_path: Path) -> None:
    with make_client(tmp_path / "home") as client:  # no version, no bootstrap
        assert client.get("/v2/health/live").json() == {"live": True}
        body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 2, 2],
                            "data": [0] * 12}]}  # fmt: skip
        for r in (client.get("/v2/health/ready"), client.get("/v2/models/alexnet"),
                  client.get("/v2/models/alexnet/ready"),
                  client.post("/v2/models/alexnet/infer", json=body)):  # fmt: skip
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert set(r.json()) == {"error"} and "no model is loaded" in r.json()["error"]
        # an unknown name is 404 whether or not a model is loaded
        assert client.get("/v2/models/resnet").status_code == 404
