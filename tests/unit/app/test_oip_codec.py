"""The Open Inference Protocol's messages (app/oip.py): tensors in and out of a body, JSON
and binary, and every malformed message refused with a reason."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest

from app.oip import Output, TensorError, encode_response, parse_request


def body(
    inputs: list[dict[str, Any]], binary: bytes = b"", **extra: Any
) -> tuple[bytes, str | None]:
    head = json.dumps({"inputs": inputs, **extra}).encode()
    return head + binary, (str(len(head)) if binary else None)


def test_json_numbers_flat_or_nested_and_bytes_in_base64() -> None:
    nested = [[[1, 2], [3, 4]]]
    req, [t] = parse_request(*body([{"name": "x", "datatype": "UINT8", "shape": [1, 2, 2],
                                      "data": nested}]))  # fmt: skip
    assert t.array is not None and t.array.dtype == np.uint8
    assert t.array.tolist() == nested and req.id is None
    _, [t] = parse_request(
        *body([{"name": "x", "datatype": "FP32", "shape": [3], "data": [0, 0.5, -1e3]}])
    )
    assert (
        t.array is not None and t.array.dtype == np.float32 and t.array.tolist() == [0, 0.5, -1000]
    )
    files = [b"\xff\xd8 jpeg", b"\x89PNG"]
    _, [t] = parse_request(*body([{"name": "image", "datatype": "BYTES", "shape": [2],
                                   "data": [base64.b64encode(f).decode() for f in files]}]))  # fmt: skip
    assert t.items == files


def test_binary_tensors_follow_the_header_in_input_order() -> None:
    pixels = np.arange(12, dtype=np.float32)
    files = [b"first", b"", b"third"]
    blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
    inputs = [
        {"name": "a", "datatype": "FP32", "shape": [3, 4],
         "parameters": {"binary_data_size": pixels.nbytes}},
        {"name": "b", "datatype": "BYTES", "shape": [3, 1],
         "parameters": {"binary_data_size": len(blob)}},
    ]  # fmt: skip
    _, [a, b] = parse_request(*body(inputs, pixels.tobytes() + blob))
    assert (
        a.array is not None
        and a.array.shape == (3, 4)
        and a.array.reshape(-1).tolist() == pixels.tolist()
    )
    assert b.items == files


@pytest.mark.parametrize(("inputs", "binary", "header", "message"), [
    ([{"name": "x", "datatype": "UINT8", "shape": [2], "data": [1]}], b"", None, "has 2 elements, data has 1"),
    ([{"name": "x", "datatype": "UINT8", "shape": [1], "data": [256]}], b"", None, "outside UINT8's range"),
    ([{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1.5]}], b"", None, "UINT8 data holds 1.5"),
    ([{"name": "x", "datatype": "FP32", "shape": [1], "data": [True]}], b"", None, "FP32 data holds true"),
    ([{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}], b"", None, 'FP32 data holds "1"'),
    ([{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}], b"", None, "not valid base64"),
    ([{"name": "x", "datatype": "BYTES", "shape": [1], "data": [3]}], b"", None, "base64 strings"),
    ([{"name": "x", "datatype": "COMPLEX", "shape": [1], "data": [1]}], b"", None, "unknown datatype"),
    ([{"name": "x", "datatype": "BF16", "shape": [1], "data": [1]}], b"", None, "BF16 inputs are not accepted"),
    ([{"name": "x", "datatype": "BF16", "shape": [1], "parameters": {"binary_data_size": 2}}],
     b"\0\0", "auto", "BF16 inputs are not accepted"),
    ([{"name": "x", "datatype": "UINT8", "shape": [1]}], b"", None, "no data and no binary_data_size"),
    ([{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}],
     b"\0" * 4, "auto", "takes 8 bytes, binary_data_size says 4"),
    ([{"name": "x", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 8}}],
     b"\0" * 4, "auto", "only 4 bytes of binary data follow"),
    ([{"name": "x", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}],
     b"\0" * 6, "auto", "2 bytes of binary data after the tensors"),
    ([{"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 2}}],
     b"\0\0", "auto", "length is cut off"),
    ([{"name": "x", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 5}}],
     struct.pack("<I", 1) + b"a", "auto", "shape [2] has 2 elements but the binary data holds 1"),
    ([{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}], b"", "12x", "must be a byte count"),
    ([{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}], b"", "99999", "but the body has"),
    ([{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}], b"", "\u00b2", "must be a byte count"),
    ([], b"", None, "not an inference request: inputs"),
    ([{"name": "x", "datatype": "UINT8", "shape": ["1"], "data": [1]}], b"", None, "not an inference request"),
])  # fmt: skip
def test_malformed_messages_are_refused_with_a_reason(
    inputs: list[dict[str, Any]], binary: bytes, header: str | None, message: str
) -> None:
    data, auto = body(inputs, binary)
    with pytest.raises(TensorError, match=None) as err:
        parse_request(data, auto if header == "auto" else header)
    assert message in str(err.value), str(err.value)


def test_responses_in_json_or_with_binary_outputs() -> None:
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    head = {"model_name": "alexnet", "model_version": "v1"}
    data, length = encode_response(
        head, [Output("probabilities", "FP32", [1, 2], False, array=probs)]
    )
    assert length is None
    assert json.loads(data)["outputs"] == [{"name": "probabilities", "datatype": "FP32",
                                            "shape": [1, 2], "data": [0.25, 0.75]}]  # fmt: skip
    outs = [Output("probabilities", "FP32", [1, 2], True, array=probs),
            Output("probabilities", "BYTES", [1, 1], True, items=[b"0.750000:1:dog"])]  # fmt: skip
    data, length = encode_response(head, outs)
    assert length is not None
    header = json.loads(data[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [8, 4 + 14] and len(data) == length + sum(sizes)
    assert np.frombuffer(data[length : length + 8], "<f4").tolist() == [0.25, 0.75]
    assert data[length + 8 :] == struct.pack("<I", 14) + b"0.750000:1:dog"
