"""Response bodies of the public API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.errors import ErrorDetail


class Prediction(BaseModel):
    label: str = Field(examples=["tabby"])
    index: int = Field(examples=[281])
    probability: float = Field(ge=0, le=1, examples=[0.8312])


class ModelRef(BaseModel):
    name: str = Field(examples=["alexnet"])
    version: str = Field(examples=["20261127-031500-ab12"])


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]

    model_config = {"json_schema_extra": {"examples": [{
        "model": {"name": "alexnet", "version": "20261127-031500-ab12"},
        "predictions": [{"label": "tabby", "index": 281, "probability": 0.83},
                        {"label": "tiger cat", "index": 282, "probability": 0.11}],
    }]}}  # fmt: skip


class FileResult(BaseModel):
    filename: str
    predictions: list[Prediction] | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[FileResult]

    model_config = {"json_schema_extra": {"examples": [{
        "model": {"name": "alexnet", "version": "20261127-031500-ab12"},
        "results": [
            {"filename": "cat.jpg", "predictions": [
                {"label": "tabby", "index": 281, "probability": 0.83}]},
            {"filename": "notes.txt", "error": {
                "code": "unsupported_media_type", "message": "not an accepted image format",
                "details": None}},
        ],
    }]}}  # fmt: skip


class VersionSummary(BaseModel):
    version: str
    arch: str
    num_classes: int
    image_size: int
    dataset: str | None
    source: str
    parent: str | None
    created_at: str
    metrics: dict[str, Any]
    active: bool
    serving: bool


class ModelsResponse(BaseModel):
    active: str | None = Field(description="the version in ACTIVE on disk")
    serving: str | None = Field(description="the version answering requests now")
    versions: list[VersionSummary]


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    version: str | None = None
    device: str | None = None
    precision: str | None = None


def multipart_body(field: str, *, many: bool) -> dict[str, Any]:
    """An OpenAPI requestBody for image uploads (the route parses the form itself, so
    that the limits apply while the body streams in)."""
    item = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": item} if many else item
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: schema}}}}}}  # fmt: skip
