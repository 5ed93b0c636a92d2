"""The reward service's settings: one typed object, ``MRC_*`` environment variables + ``mrc serve`` flags.

The metric's own settings (:class:`~carve3d_reward.settings.MetricSettings`)
are nested under ``metric`` and read from the same ``MRC_*`` variables.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..settings import MetricSettings

EngineName = Literal["inprocess", "triton"]


class ServiceSettings(BaseSettings):
    """Settings of ``mrc serve`` (env prefix ``MRC_``)."""

    model_config = SettingsConfigDict(env_prefix="MRC_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on ('0.0.0.0' for all interfaces).")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port).")
    engine: EngineName = Field("inprocess", description="Execution engine.")
    max_batch: int = Field(16, ge=1, le=1024, description="Most grids scored in one batch.")
    max_delay_ms: float = Field(5.0, ge=0.0, le=10_000, description="Longest wait for a batch to fill.")
    max_queue: int = Field(256, ge=1, description="Most grids waiting; beyond it requests get 503 at once.")
    max_queue_pixels: int = Field(
        256 * 1024 * 1024, ge=256, description="Most pixels waiting, at the working resolution (503 beyond, at once)."
    )
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request deadline on the server (then 504).")
    drain_timeout_s: float = Field(60.0, ge=0, description="On SIGTERM, how long to finish accepted requests.")
    auth_token: SecretStr | None = Field(None, description="Bearer token required on every request (unset: none).")
    open_health: bool = Field(True, description="/healthz and /readyz need no token.")
    open_metrics: bool = Field(True, description="/metrics needs no token.")
    max_body_bytes: int = Field(64 << 20, ge=1024, description="Largest request body (413 beyond).")
    max_pixels: int = Field(
        4096 * 4096, ge=256, description="Largest grid, in pixels, read from its header before decoding (413 beyond)."
    )
    max_request_pixels: int = Field(
        256 * 1024 * 1024, ge=256, description="Most pixels of all the grids of one request, before decoding (413)."
    )
    max_grids: int = Field(256, ge=1, description="Most grids in one request.")
    decode_threads: int = Field(
        2, ge=1, le=64, description="Grids decoded at once across all requests (bounds the memory decoding takes)."
    )
    idempotency_ttl_s: float = Field(
        600.0, ge=0, description="How long a repeated request (same id, body and options) is answered from memory."
    )
    idempotency_max: int = Field(4096, ge=0, description="Most requests remembered for idempotent retries.")
    triton_url: str | None = Field(
        None,
        description="Engine 'triton': gRPC host:port of a running Triton serving model 'mrc' (e.g. the stock "
        "container with services/reward/triton/model_repository); unset: mrc serve starts Triton itself (PyTriton).",
    )
    triton_instances: int = Field(1, ge=1, le=64, description="Model instances in the Triton started by mrc serve.")
    triton_http_port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Triton started by mrc serve.")
    triton_grpc_port: int = Field(8001, ge=1, le=65535, description="gRPC port of the Triton started by mrc serve.")
    triton_metrics_port: int = Field(
        8002, ge=1, le=65535, description="Prometheus port (nv_inference_*) of the Triton started by mrc serve."
    )
    metric: MetricSettings = Field(default_factory=MetricSettings, description="The metric's settings.")
