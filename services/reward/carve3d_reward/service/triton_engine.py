"""The gateway's Triton engine: each request's grids go to Triton over async gRPC, Triton batches.

:class:`TritonEngine` is an :class:`~.batcher.AsyncEngine`: ``create_app(settings,
model=..., engine=TritonEngine(...))`` serves it behind a
:class:`~.batcher.PassThroughBatcher`, so the gateway adds no batching delay of
its own: Triton's dynamic batcher gathers grids across requests (and across
gateways). Replies are turned into the proto-shaped dicts of the in-process
engine by the same function (:meth:`~carve3d_reward.model.ModelOutputs.scores`).

Failure handling:

- Triton unreachable, shutting down, or the model not loaded -> :class:`EngineUnavailableError`
  (the gateway answers 503 with ``Retry-After``, ``/readyz`` fails). The gRPC
  channel is then dropped, and the next call or probe opens a fresh one, so the
  gateway recovers as soon as Triton is back, without gRPC's reconnect backoff.
- Any other Triton error fails the call; the pass-through batcher splits it in
  halves down to the failing grid (``status: "error"`` in a 200 reply).
- Re-renders (``return_renders``) are not part of the Triton interface:
  ``supports_renders`` is False and the gateway answers 400.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from ..scores import GridScore
from ..triton.tensors import INPUT, MODEL_NAME, OUTPUT_SPECS, outputs_from_tensors
from .batcher import EngineUnavailableError

log = logging.getLogger("carve3d_reward.service")

#: gRPC status codes (as tritonclient reports them) that mean "not now", not "bad request".
UNAVAILABLE_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.CANCELLED"})


class TritonEngine:
    """Scores grids on a Triton server's model ``mrc`` with ``tritonclient.grpc.aio``.

    ``url`` is the gRPC ``host:port``; ``metric_id`` labels the results (the
    gateway's own metric id: run Triton with the same metric settings);
    ``max_batch`` splits requests larger than the model's ``max_batch_size``
    (read from Triton's model config once it answers; this is the fallback).
    """

    supports_renders = False

    def __init__(
        self,
        url: str,
        *,
        metric_id: str,
        model_name: str = MODEL_NAME,
        max_batch: int = 16,
        timeout_s: float = 120.0,
        probe_timeout_s: float = 2.0,
        retry_after_s: float = 2.0,
    ) -> None:
        try:
            import tritonclient.grpc.aio  # noqa: F401
        except ImportError:
            from ..errors import ConfigError

            raise ConfigError("engine 'triton' needs tritonclient: pip install 'carve3d-reward[triton]'") from None
        self.url = url
        self.metric_id = metric_id
        self.model_name = model_name
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.retry_after_s = retry_after_s
        self._client: Any = None
        self._config_read = False
        self._closed = False

    # -- AsyncEngine ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to do: the channel opens on first use (Triton may start after the gateway)."""
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        await self._reset(self._client)

    async def ready(self) -> tuple[bool, str]:
        """Triton answers and model ``mrc`` is ready (the gateway's ``/readyz``)."""
        from tritonclient.utils import InferenceServerException

        client = self._get_client()
        try:
            ok = await client.is_model_ready(self.model_name, client_timeout=self.probe_timeout_s)
            if ok and not self._config_read:
                await self._read_config(client)
        except (InferenceServerException, OSError) as exc:  # OSError includes TimeoutError
            await self._reset(client)
            return False, f"triton at {self.url} is unreachable: {_message(exc)}"
        if not ok:
            return False, f"model {self.model_name!r} is not ready on triton at {self.url}"
        return True, ""

    async def __call__(self, grids: np.ndarray, want_renders: bool) -> list[GridScore]:
        """Score ``[B, H, W, 3]`` uint8 grids (one Triton request per ``max_batch`` of them)."""
        if want_renders:
            raise ValueError("re-renders are not available through Triton")
        if self._closed:
            raise EngineUnavailableError("the triton engine is closed", self.retry_after_s)
        step = max(1, self.max_batch)
        parts = await asyncio.gather(*(self._infer(grids[i : i + step]) for i in range(0, len(grids), step)))
        return [item for part in parts for item in part]

    # -- internals -----------------------------------------------------------------------------------
    async def _infer(self, grids: np.ndarray) -> list[GridScore]:
        from tritonclient.grpc.aio import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        client = self._get_client()
        tensor = InferInput(INPUT.name, list(grids.shape), INPUT.datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(grids, dtype=INPUT.numpy_dtype))
        try:
            reply = await client.infer(
                self.model_name,
                [tensor],
                outputs=[InferRequestedOutput(spec.name) for spec in OUTPUT_SPECS],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            if exc.status() in UNAVAILABLE_STATUSES:
                await self._reset(client)
                raise EngineUnavailableError(
                    f"triton at {self.url} is unavailable: {_message(exc)}", self.retry_after_s
                ) from None
            raise RuntimeError(f"triton: {_message(exc)}") from None
        except OSError as exc:
            await self._reset(client)
            raise EngineUnavailableError(f"triton at {self.url} is unreachable: {exc}", self.retry_after_s) from None
        tensors = {spec.name: reply.as_numpy(spec.name) for spec in OUTPUT_SPECS}
        return outputs_from_tensors(tensors).scores(self.metric_id)

    def _get_client(self) -> Any:
        if self._client is None:
            from tritonclient.grpc.aio import InferenceServerClient

            self._client = InferenceServerClient(self.url)
        return self._client

    async def _reset(self, client: Any) -> None:
        """Drop ``client``'s channel (if it is still the current one); the next call opens a new one."""
        if client is None or client is not self._client:
            return
        self._client = None
        self._config_read = False
        try:
            await client.close()
        except Exception as exc:  # noqa: BLE001 - a broken channel may fail to close; it is dropped anyway
            log.debug("closing the triton channel: %s", exc)

    async def _read_config(self, client: Any) -> None:
        config = await client.get_model_config(self.model_name, as_json=True, client_timeout=self.probe_timeout_s)
        size = int(config.get("config", {}).get("max_batch_size", 0) or 0)
        if size > 0 and size != self.max_batch:
            log.info("triton model %r takes batches of up to %d grids", self.model_name, size)
            self.max_batch = size
        self._config_read = True


def _message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return (text or type(exc).__name__).strip().splitlines()[0]
