"""The Open Inference Protocol (KServe V2) against a real uvicorn server, driven by Triton's
own HTTP client library (tritonclient, from PyPI): metadata and health, image files and
preprocessed tensors in JSON and with the binary tensor data extension, the classification
extension, a batch, and malformed requests. Every answer is checked against /v1/classify's
for the same image."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from model.checkpoint import ModelCard, load_version  # noqa: E402
from model.device import Placement  # noqa: E402
from model.images import DecodeLimits  # noqa: E402
from model.predictor import Predictor  # noqa: E402
from tests.helpers.server import Server  # noqa: E402
from tests.helpers.versions import make_version  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_FILES = 4
MAX_QUEUE = 3  # a request of 4 images can never be queued: 413
MAX_UPLOAD = 2_000_000
INFER_LIMIT = MAX_UPLOAD * MAX_FILES * 4 // 3 + 64 * 1024  # app/intake.py
IN_FLIGHT = 1_000_000  # upload bytes being received at once (ALEXNET_MAX_UPLOAD_BYTES_IN_FLIGHT)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ModelCard]]:
    home = tmp_path_factory.mktemp("home")
    card = make_version(home / "models", activate=True, probes=True, num_classes=10,
                        labels=[f"thing {i}" for i in range(10)])  # fmt: skip
    srv = Server(home, ALEXNET_PRECISION="fp32", ALEXNET_MAX_FILES=str(MAX_FILES),
                 ALEXNET_MAX_QUEUE=str(MAX_QUEUE), ALEXNET_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
                 ALEXNET_MAX_UPLOAD_BYTES_IN_FLIGHT=str(IN_FLIGHT)).start()  # fmt: skip
    try:
        yield srv, card
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def client(served: tuple[Server, ModelCard]) -> Any:
    srv, _ = served
    return tritonclient_http.InferenceServerClient(url=srv.url.removeprefix("http://"),
                                                   network_timeout=60.0)  # fmt: skip


@pytest.fixture(scope="module")
def photos(jpeg_photos: list[Path], png_photos: list[Path]) -> list[bytes]:
    return [jpeg_photos[0].read_bytes(), png_photos[1].read_bytes(), jpeg_photos[2].read_bytes()]


@pytest.fixture(scope="module")
def predictor(served: tuple[Server, ModelCard]) -> Predictor:
    srv, card = served
    net, card = load_version(srv.home / "models" / card.version)
    return Predictor(net, card, Placement(torch.device("cpu"), "fp32"))


def v1_top5(srv: Server, data: bytes) -> list[tuple[int, float]]:
    r = httpx.post(srv.url + "/v1/classify", files={"file": ("x", data)}, timeout=30)
    assert r.status_code == 200, r.text
    return [(p["index"], p["probability"]) for p in r.json()["predictions"]]


def assert_same_top5(probs: np.ndarray, expected: list[tuple[int, float]]) -> None:
    order = np.argsort(-probs, kind="stable")[:5]
    assert [int(i) for i in order] == [i for i, _ in expected]
    for i, p in expected:
        assert abs(float(probs[i]) - p) < 1e-5
    assert abs(float(probs.sum()) - 1) < 1e-4


def bytes_input(photos: list[bytes], *, binary: bool, shape: list[int] | None = None) -> Any:
    arr = np.array(photos if binary else [base64.b64encode(p) for p in photos], dtype=np.object_)
    inp = tritonclient_http.InferInput("image", shape or [len(photos)], "BYTES")
    inp.set_data_from_numpy(arr.reshape(shape or [len(photos)]), binary_data=binary)
    return inp


def test_health_and_metadata_describe_the_served_version(
    client: Any, served: tuple[Server, ModelCard]
) -> None:
    _, card = served
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "alexnet-service"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get_model_metadata("alexnet")
    assert meta["name"] == "alexnet" and meta["versions"] == [card.version]
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES"
    assert inputs["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]}
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("alexnet", card.version)["versions"] == [card.version]
    assert client.is_model_ready("alexnet") and client.is_model_ready("alexnet", card.version)
    assert not client.is_model_ready("resnet")
    assert not client.is_model_ready("alexnet", "v-not-served")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_image_files_get_the_same_answers_as_v1(
    client: Any, served: tuple[Server, ModelCard], photos: list[bytes], binary: bool
) -> None:
    srv, card = served
    out = tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer("alexnet", [bytes_input(photos, binary=binary)], outputs=[out],
                          request_id="req-1")  # fmt: skip
    response = result.get_response()
    assert response["model_name"] == "alexnet" and response["model_version"] == card.version
    assert response["id"] == "req-1"
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(photos), 10)
    for row, data in zip(probs, photos, strict=True):
        assert_same_top5(row, v1_top5(srv, data))
    ids = response["parameters"]["prediction_ids"].split(",")
    assert len(ids) == len(photos) and len(set(ids)) == len(photos)


def test_compressed_requests_are_inflated_within_the_limit(
    client: Any, served: tuple[Server, ModelCard], photos: list[bytes]
) -> None:
    srv, _ = served
    expected = v1_top5(srv, photos[0])
    for algorithm in ("gzip", "deflate"):  # as Triton's client compresses a request
        result = client.infer("alexnet", [bytes_input(photos[:1], binary=True)],
                              request_compression_algorithm=algorithm)  # fmt: skip
        assert_same_top5(result.as_numpy("probabilities")[0], expected)
    bomb = gzip.compress(b"\0" * (INFER_LIMIT + 1))  # ~10 KB that would inflate past the limit
    r = httpx.post(srv.url + "/v2/models/alexnet/infer", content=bomb, timeout=30,
                   headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert r.status_code == 413 and "inflates past" in r.json()["error"], r.text
    r = httpx.post(srv.url + "/v2/models/alexnet/infer", content=b"{}", timeout=30,
                   headers={"Content-Encoding": "br"})  # fmt: skip
    assert r.status_code == 415 and set(r.json()) == {"error"}, r.text


def test_the_classification_extension_answers_score_index_label(
    client: Any, served: tuple[Server, ModelCard], photos: list[bytes]
) -> None:
    srv, card = served
    for binary in (True, False):
        out = tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary,
                                                     class_count=5)  # fmt: skip
        shape = [len(photos), 1]  # [N, 1] is accepted as well as [N]
        result = client.infer("alexnet", [bytes_input(photos, binary=True, shape=shape)],
                              outputs=[out])  # fmt: skip
        top = result.as_numpy("probabilities")
        assert top.shape == (len(photos), 5)
        for row, data in zip(top, photos, strict=True):
            expected = v1_top5(srv, data)
            # binary: bytes; JSON: str (the client decodes it)
            parsed = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row]
            assert [int(i) for _, i, _ in parsed] == [i for i, _ in expected]
            assert [label for _, _, label in parsed] == [card.labels[i] for i, _ in expected]
            for (score, _, _), (_, p) in zip(parsed, expected, strict=True):
                assert abs(float(score) - p) < 1e-5


@pytest.mark.parametrize(("datatype", "binary"),
                         [("UINT8", True), ("UINT8", False), ("FP32", True), ("FP32", False)])  # fmt: skip
def test_preprocessed_tensors_get_the_same_answers(
    client: Any, served: tuple[Server, ModelCard], photos: list[bytes], predictor: Predictor,
    datatype: str, binary: bool,
) -> None:  # fmt: skip
    """UINT8: the pixels after the version's resize and crop; FP32: those normalised with
    its mean and std (what an ONNX export takes)."""
    srv, card = served
    pixels = torch.stack([predictor.decode(p, DecodeLimits()) for p in photos])
    if datatype == "UINT8":
        arr = pixels.numpy()
    else:
        pre = card.preprocessing
        mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        std = torch.tensor(pre.std).view(1, 3, 1, 1)
        arr = ((pixels.float() / 255 - mean) / std).numpy().astype(np.float32)
    inp = tritonclient_http.InferInput("input", list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=binary)
    result = client.infer("alexnet", [inp])  # no outputs named: all of them, binary
    probs = result.as_numpy("probabilities")
    assert probs.shape == (len(photos), 10)
    for row, data in zip(probs, photos, strict=True):
        assert_same_top5(row, v1_top5(srv, data))
    assert "parameters" not in result.get_response()  # no file was kept: no prediction ids


def _expect_error(client: Any, *args: Any, status: str, text: str, **kw: Any) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer(*args, **kw)
    assert err.value.status() == status, err.value
    assert text in err.value.message(), err.value.message()


def test_bad_tensors_unknown_models_and_overload_are_refused(
    client: Any, served: tuple[Server, ModelCard], photos: list[bytes]
) -> None:
    _, card = served
    wrong_type = tritonclient_http.InferInput("input", [1, 3, 64, 64], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 3, 64, 64), dtype=np.int32))
    _expect_error(
        client, "alexnet", [wrong_type], status="400", text="datatype INT32 is not accepted"
    )
    wrong_shape = tritonclient_http.InferInput("input", [1, 3, 32, 32], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.uint8))
    _expect_error(client, "alexnet", [wrong_shape], status="400", text="[N, 3, 64, 64]")
    # decoded and checked like uploads: the same statuses
    not_an_image = bytes_input([photos[0], b"certainly not an image"], binary=True)
    _expect_error(client, "alexnet", [not_an_image], status="415", text="element 1")
    truncated = bytes_input([photos[0], photos[0][: len(photos[0]) // 2]], binary=True)
    _expect_error(client, "alexnet", [truncated], status="400", text="element 1")
    _expect_error(client, "resnet", [bytes_input(photos[:1], binary=True)], status="404",
                  text="this server serves 'alexnet'")  # fmt: skip
    _expect_error(client, "alexnet", [bytes_input(photos[:1], binary=True)], status="404",
                  model_version="v-not-served", text=f"the served version is {card.version!r}")  # fmt: skip
    too_many = bytes_input(photos[:1] * (MAX_FILES + 1), binary=True)
    _expect_error(client, "alexnet", [too_many], status="413", text="ALEXNET_MAX_FILES")
    two_outputs = [tritonclient_http.InferRequestedOutput("probabilities")] * 2
    _expect_error(client, "alexnet", [bytes_input(photos[:1], binary=True)],
                  outputs=two_outputs, status="400", text="2 outputs requested")  # fmt: skip
    unknown_output = tritonclient_http.InferRequestedOutput("logits")
    _expect_error(client, "alexnet", [bytes_input(photos[:1], binary=True)],
                  outputs=[unknown_output], status="400", text="unknown output 'logits'")  # fmt: skip


def _raw_infer(srv: Server, header: dict[str, Any], binary: bytes,
               header_length: int | None = None) -> httpx.Response:  # fmt: skip
    head = json.dumps(header).encode()
    return httpx.post(srv.url + "/v2/models/alexnet/infer", content=head + binary, timeout=30,
                      headers={"Inference-Header-Content-Length": str(header_length or len(head))})  # fmt: skip


def test_a_lying_binary_size_is_refused_in_the_protocols_error_shape(
    served: tuple[Server, ModelCard], photos: list[bytes]
) -> None:
    srv, _ = served
    blob = struct.pack("<I", len(photos[0])) + photos[0]

    def header(size: int) -> dict[str, Any]:
        return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "parameters": {"binary_data_size": size}}]}  # fmt: skip

    cases = [
        (header(len(blob) + 10), blob, "only"),  # claims more than follows
        (header(len(blob) - 10), blob, "longer than the binary data left"),  # element cut
        (header(len(blob)), blob + b"extra", "claimed by no input"),  # bytes left over
    ]
    for head, binary, text in cases:
        r = _raw_infer(srv, head, binary)
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"} and text in r.json()["error"], r.json()
    r = _raw_infer(srv, header(len(blob)), blob, header_length=len(blob) * 10)
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    # the same request, honest, is answered
    r = _raw_infer(srv, header(len(blob)), blob)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["outputs"][0]["shape"] == [1, 10]


def test_overload_is_429_with_retry_after_and_errors_keep_the_protocols_shape(
    served: tuple[Server, ModelCard], photos: list[bytes]
) -> None:
    """A request the queue can never hold is 413 (not a 429 retried for ever); while
    another upload holds the in-flight budget the middleware refuses with 429 and
    Retry-After, in the protocol's shape; parse errors and unknown models too."""
    srv, _ = served
    arr = np.zeros((MAX_QUEUE + 1, 3, 64, 64), dtype=np.uint8)
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(arr.shape),
                        "data": arr.reshape(-1).tolist()}]}  # fmt: skip
    r = httpx.post(srv.url + "/v2/models/alexnet/infer", json=body, timeout=30)
    assert r.status_code == 413 and "ALEXNET_MAX_QUEUE" in r.json()["error"], r.text
    # an upload of IN_FLIGHT bytes that holds back its end: the budget is spent
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": IN_FLIGHT + 4}}]}).encode()  # fmt: skip
    raw = (f"POST /v2/models/alexnet/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
           f"{len(head) + IN_FLIGHT + 4}\r\nInference-Header-Content-Length: {len(head)}\r\n\r\n"
           ).encode() + head + struct.pack("<I", IN_FLIGHT) + b"\0" * (IN_FLIGHT - 10)  # fmt: skip
    holder = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        holder.sendall(raw)
        deadline = time.monotonic() + 30  # until the server has read what it was sent
        while True:
            r = httpx.post(srv.url + "/v2/models/alexnet/infer", json=body, timeout=30)
            if r.status_code == 429 or time.monotonic() > deadline:
                break
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        assert set(r.json()) == {"error"} and "bytes of uploads" in r.json()["error"]
    finally:
        holder.close()
    r = httpx.post(srv.url + "/v2/models/alexnet/infer", content=b"{not json", timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.get(srv.url + "/v2/models/resnet", timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    # a declared body over the limit: refused by the middleware before it is read
    r = httpx.post(srv.url + "/v2/models/alexnet/infer", content=b"x" * (INFER_LIMIT + 1),
                   timeout=30)  # fmt: skip
    assert r.status_code == 413 and set(r.json()) == {"error"}, r.text
    # our own API keeps its envelope
    r = httpx.get(srv.url + "/v1/models/nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
