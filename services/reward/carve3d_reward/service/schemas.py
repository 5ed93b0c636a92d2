"""JSON shapes of the API for the OpenAPI document (fields mirror ``proto/mrc.proto``).

These describe the wire for the document only: scores are
:class:`carve3d_reward.scores.GridScore` everywhere in the code, and a test
checks that :class:`GridScoreModel` has exactly the fields of its ``to_wire()``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from ..scores import Status


class GridModel(BaseModel):
    image: str | None = Field(None, description="PNG, JPEG or WebP bytes (base64 in JSON, raw bytes in msgpack).")
    data: str | None = Field(None, description="Raw row-major uint8 pixels (base64 in JSON).")
    shape: list[int] | None = Field(None, description="[H, W, 3] of data.")
    dtype: str = Field("uint8", description="Only 'uint8'.")


class ScoreRequestModel(BaseModel):
    grids: list[GridModel]
    return_renders: bool = False
    request_id: str = ""


class ViewScoreModel(BaseModel):
    distance: float
    bbox: list[int] = Field(description="(x_min, y_min, x_max, y_max), inclusive, working-resolution pixels.")
    empty: bool


class GridScoreModel(BaseModel):
    mrc: float | None = Field(description="Lower is more 3D-consistent; null when status is 'invalid'/'error'.")
    reward: float | None = Field(description="-mrc.")
    status: Status = Field(
        description="ok: use it; empty_view: scored, keep out of statistics; invalid, error: not scored."
    )
    views: list[ViewScoreModel]
    metric: str
    version: str
    error: str = ""
    renders: list[str] = Field(default_factory=list, description="PNG per view (base64 in JSON).")


class ScoreResponseModel(BaseModel):
    results: list[GridScoreModel]
    request_id: str
    metric: str


class ErrorModel(BaseModel):
    error: str = Field(description="Machine-readable code.")
    detail: str = Field(description="What is wrong, in one sentence.")
    request_id: str


class InfoModel(BaseModel):
    version: str
    metric: str
    engine: str
    settings: dict[str, Any]
    layout: dict[str, Any]
    cameras: dict[str, Any]
    limits: dict[str, Any]
    device: str


#: ``POST /mrc``'s query parameter and request bodies (parsed by hand, so described here for the OpenAPI document).
SCORE_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": "return_renders", "in": "query", "schema": {"type": "boolean"}, "required": False}],
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"grid": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/msgpack": {"schema": {"$ref": "#/components/schemas/ScoreRequestModel"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequestModel"}},
        },
    },
}


def document_request_body(app: FastAPI) -> None:
    """Add the msgpack/JSON request message to the OpenAPI components (it is parsed by hand)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            request = ScoreRequestModel.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request.pop("$defs", {}))
            components["ScoreRequestModel"] = request
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
