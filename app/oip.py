"""The Open Inference Protocol's (KServe V2) REST messages: the schemas, and tensors in and
out of a request body, in JSON or with the binary tensor data extension.

A request body is the JSON header, then (binary extension) the raw tensors one after the
other, in input order: `Inference-Header-Content-Length` says how long the header is and
each input's `parameters.binary_data_size` how many bytes its tensor takes. Numbers are
little-endian and row-major; a BYTES tensor is each element's 4-byte little-endian length
then its bytes. In JSON a tensor's `data` is its elements, flat or nested, row-major; a
BYTES element (an image file, not text) is base64 (RFC 4648).

No HTTP here: a malformed message raises `TensorError` (the route answers 400).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Final

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
MAX_DIMS: Final = 8

# What the protocol's datatypes are in numpy (BYTES is a list of bytes instead).
NUMPY: Final[dict[str, str]] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
DATATYPES: Final = (*NUMPY, "BYTES", "BF16")

Param = StrictBool | StrictInt | StrictFloat | StrictStr
Dim = Annotated[int, Field(ge=0, le=2**31)]


class TensorError(ValueError):
    """The message is not a well-formed inference request (400)."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class RequestInput(_Strict):
    name: StrictStr = Field(min_length=1, max_length=256)
    shape: list[Dim] = Field(max_length=MAX_DIMS)
    datatype: StrictStr
    parameters: dict[str, Param] | None = None
    data: list[Any] | None = Field(
        None, description="the elements, flat or nested, row-major; BYTES elements base64"
    )


class RequestOutput(_Strict):
    name: StrictStr = Field(min_length=1, max_length=256)
    parameters: dict[str, Param] | None = Field(
        None,
        description="`binary_data`: answer this output as raw bytes after the JSON; "
        "`classification`: k, the top k classes as BYTES 'score:index:label'",
    )


class InferRequest(_Strict):
    id: StrictStr | None = Field(None, max_length=256)
    parameters: dict[str, Param] | None = Field(
        None, description="`binary_data_output`: every output as raw bytes"
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=16)
    outputs: list[RequestOutput] | None = Field(None, max_length=16)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Param] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Param] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Param] | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ProtocolError(BaseModel):
    error: str


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its $defs inlined (for an OpenAPI request body)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out


# ----------------------------------------------------------------------------- requests


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray[Any, Any] | None = None  # numeric tensors
    items: list[bytes] | None = None  # BYTES tensors, flat

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def _where(errors: PydanticValidationError) -> str:
    first = errors.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"{loc}: {first.get('msg', 'invalid')}"


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary rest (empty without the extension's header)."""
    if header_length is None:
        return body, b""
    if re.fullmatch(r"\s*[0-9]{1,12}\s*", header_length) is None:
        raise TensorError(f"{HEADER_LENGTH} must be a byte count, not {header_length[:40]!r}")
    n = int(header_length)
    if not 0 < n <= len(body):
        raise TensorError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    return body[:n], body[n:]


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list[Tensor]]:
    """The request and its inputs' tensors, every size and count checked against the
    declared shape."""
    header, rest = split_body(body, header_length)
    try:
        request = InferRequest.model_validate_json(header)
    except PydanticValidationError as exc:
        raise TensorError(f"not an inference request: {_where(exc)}") from None
    tensors: list[Tensor] = []
    offset = 0
    for inp in request.inputs:
        if inp.datatype not in DATATYPES:
            raise TensorError(f"input '{inp.name}': unknown datatype {inp.datatype[:40]!r}")
        if inp.datatype == "BF16":
            raise TensorError(f"input '{inp.name}': BF16 inputs are not accepted")
        tensor = Tensor(inp.name, inp.datatype, list(inp.shape))
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise TensorError(f"input '{inp.name}': binary_data_size must be a byte count")
            if inp.data is not None:
                raise TensorError(f"input '{inp.name}': both data and binary_data_size")
            chunk = rest[offset : offset + size]
            if len(chunk) < size:
                raise TensorError(
                    f"input '{inp.name}': binary_data_size is {size} but only "
                    f"{len(chunk)} bytes of binary data follow"
                )
            offset += size
            _from_binary(tensor, chunk)
        elif inp.data is not None:
            _from_json(tensor, inp.data)
        else:
            raise TensorError(f"input '{inp.name}': no data and no binary_data_size")
        tensors.append(tensor)
    if offset != len(rest):
        raise TensorError(
            f"{len(rest) - offset} bytes of binary data after the tensors are claimed by no "
            "input's binary_data_size"
        )
    return request, tensors


def _same_count(t: Tensor, n: int, says: str) -> None:
    if n != t.count:
        raise TensorError(f"input '{t.name}': shape {t.shape} has {t.count} elements{says}{n}")


def _from_binary(t: Tensor, chunk: bytes) -> None:
    if t.datatype == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise TensorError(f"input '{t.name}': a BYTES element's length is cut off")
            (n,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + n > len(chunk):
                raise TensorError(
                    f"input '{t.name}': a BYTES element of {n} bytes is longer than the "
                    "binary data left"
                )
            items.append(chunk[pos : pos + n])
            pos += n
        _same_count(t, len(items), " but the binary data holds ")
        t.items = items
        return
    dtype = np.dtype(NUMPY[t.datatype])
    if len(chunk) != t.count * dtype.itemsize:
        raise TensorError(
            f"input '{t.name}': shape {t.shape} of {t.datatype} takes "
            f"{t.count * dtype.itemsize} bytes, binary_data_size says {len(chunk)}"
        )
    t.array = np.frombuffer(chunk, dtype=dtype).reshape(t.shape)


def _flat(data: list[Any], limit: int) -> Iterator[Any]:
    stack: list[Iterator[Any]] = [iter(data)]
    seen = 0
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            seen += 1
            if seen > limit:
                return
            yield v
        else:
            stack.pop()


def _from_json(t: Tensor, data: list[Any]) -> None:
    if t.datatype == "BYTES":
        items = []
        for v in _flat(data, t.count + 1):
            if not isinstance(v, str):
                raise TensorError(f"input '{t.name}': BYTES elements in JSON are base64 strings")
            try:
                items.append(base64.b64decode(v, validate=True))
            except (binascii.Error, ValueError):
                raise TensorError(f"input '{t.name}': an element is not valid base64") from None
        _same_count(t, len(items), ", data has ")
        t.items = items
        return
    values = list(_flat(data, t.count + 1))
    _same_count(t, len(values), ", data has ")
    dtype = np.dtype(NUMPY[t.datatype])
    numeric = (int,) if dtype.kind in "iu" else (bool,) if dtype.kind == "b" else (int, float)
    for v in values:
        if isinstance(v, bool) != (dtype.kind == "b") or not isinstance(v, numeric):
            raise TensorError(f"input '{t.name}': {t.datatype} data holds {json.dumps(v)[:40]}")
    try:
        arr = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else object)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            if any(not info.min <= v <= info.max for v in values):
                raise TensorError(f"input '{t.name}': a value is outside {t.datatype}'s range")
        with np.errstate(over="ignore"):  # an FP32 overflow is inf, refused by its reader
            t.array = arr.astype(dtype).reshape(t.shape)
    except OverflowError:
        raise TensorError(f"input '{t.name}': a value is outside {t.datatype}'s range") from None


# ----------------------------------------------------------------------------- responses


@dataclass
class Output:
    name: str
    datatype: str  # FP32 or BYTES
    shape: list[int]
    binary: bool
    array: np.ndarray[Any, Any] | None = None
    items: list[bytes] | None = None

    def raw(self) -> bytes:
        if self.items is not None:
            return b"".join(struct.pack("<I", len(b)) + b for b in self.items)
        assert self.array is not None
        return np.ascontiguousarray(self.array, dtype="<f4").tobytes()

    def json_data(self) -> list[Any]:
        if self.items is not None:
            return [b.decode() for b in self.items]
        assert self.array is not None
        values: list[Any] = self.array.reshape(-1).tolist()
        return values


def encode_response(head: dict[str, Any], outputs: list[Output]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    entries, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            blob = out.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.json_data()
        entries.append(entry)
    header = json.dumps({**head, "outputs": entries}, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
