"""JSON shapes of the API for the OpenAPI document (fields mirror ``proto/mrc.proto``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class GridModel(BaseModel):
    image: str | None = Field(None, description="PNG/JPEG bytes (base64 in JSON, raw bytes in msgpack).")
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
    status: str = Field(description="'ok' | 'empty_view' | 'invalid' | 'error'.")
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
