"""The HTTP API: ``POST /mrc`` plus health, readiness, metrics and info.

A thin shell: bytes are checked and decoded here, scored by the batcher, and
the batcher's results are encoded back. Every error is a JSON
``{"error", "detail", "request_id"}`` with a 4xx/5xx status; no input can
crash the worker or lose another request. Messages follow ``proto/mrc.proto``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InvalidInputError
from ..grid import TooManyPixelsError, check_grid_size, decode_image
from ..model import MRCModel
from .batcher import (
    AsyncEngine,
    DynamicBatcher,
    EngineClosedError,
    EngineUnavailableError,
    PassThroughBatcher,
    QueueFullError,
    ScoreFn,
)
from .metrics import ServiceMetrics
from .schemas import ErrorModel, GridScoreModel, InfoModel, ScoreRequestModel, ScoreResponseModel
from .settings import ServiceSettings

log = logging.getLogger("carve3d_reward.service")

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
STATUS_INVALID = "invalid"
STATUS_ERROR = "error"


class APIError(Exception):
    """An answer other than 200, with a machine-readable code and a sentence for people."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics
    model: MRCModel | None = None
    batcher: DynamicBatcher | PassThroughBatcher | None = None
    engine: AsyncEngine | None = None  # a remote engine that batches itself (Triton)
    ready: bool = False
    draining: bool = False
    responses: OrderedDict[str, tuple[float, asyncio.Future[Any]]] = field(default_factory=OrderedDict)


def make_score_fn(model: MRCModel) -> ScoreFn:
    """The in-process engine: the model callable on a batch, results as proto-shaped dicts."""

    def score(grids: np.ndarray, want_renders: bool) -> list[dict[str, Any]]:
        return model.score_dicts(grids, return_renders=want_renders)

    return score


# -- request parsing --------------------------------------------------------------------------------
@dataclass
class ParsedRequest:
    grids: list[np.ndarray | InvalidInputError]  # decoded grid, or why it is invalid
    return_renders: bool
    kind: str  # "image" | "multipart" | "structured"
    reply_msgpack: bool


def _to_uint8(grid: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(grid * 255.0), 0, 255).astype(np.uint8)


def _check_grid(grid: np.ndarray, state: ServiceState) -> np.ndarray:
    if state.model is not None:
        check_grid_size(grid.shape[0], grid.shape[1], state.model.metric.layout)
    return grid


def _decode_one(data: bytes, state: ServiceState) -> np.ndarray:
    return _check_grid(_to_uint8(decode_image(data, max_pixels=state.settings.max_pixels)), state)


def _raw_grid(entry: dict[str, Any], index: int, state: ServiceState) -> np.ndarray:
    shape, dtype, data = entry.get("shape"), entry.get("dtype", "uint8"), entry.get("data")
    where = f"grids[{index}]"
    if not isinstance(data, bytes | bytearray):
        raise APIError(400, "bad_request", f"{where}: 'data' must be bytes")
    if dtype != "uint8":
        raise APIError(400, "bad_request", f"{where}: dtype {dtype!r} is not supported; send 'uint8' pixels")
    if not (isinstance(shape, list | tuple) and len(shape) == 3 and all(isinstance(x, int) and x > 0 for x in shape)):
        raise APIError(400, "bad_request", f"{where}: 'shape' must be [H, W, 3] positive integers, got {shape!r}")
    h, w, c = shape
    if c != 3:
        raise APIError(400, "bad_request", f"{where}: expected 3 colour channels, got shape {list(shape)}")
    if h * w > state.settings.max_pixels:
        raise APIError(
            413, "too_large", f"{where}: {w}x{h} pixels is more than the limit of {state.settings.max_pixels}"
        )
    if len(data) != h * w * c:
        raise APIError(
            400, "bad_request", f"{where}: shape {list(shape)} needs {h * w * c} bytes of uint8, got {len(data)}"
        )
    return np.frombuffer(bytes(data), dtype=np.uint8).reshape(h, w, c)


def _structured_grids(payload: Any, state: ServiceState) -> tuple[list[np.ndarray | InvalidInputError], bool]:
    if not isinstance(payload, dict) or not isinstance(payload.get("grids"), list):
        raise APIError(400, "bad_request", "the body must be a map with a 'grids' list (see proto/mrc.proto)")
    entries = payload["grids"]
    if not entries:
        raise APIError(400, "bad_request", "'grids' is empty")
    if len(entries) > state.settings.max_grids:
        raise APIError(
            413, "too_many_grids", f"{len(entries)} grids in one request; the limit is {state.settings.max_grids}"
        )
    renders = payload.get("return_renders", False)
    if not isinstance(renders, bool):
        raise APIError(400, "bad_request", "'return_renders' must be a boolean")
    grids: list[np.ndarray | InvalidInputError] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise APIError(400, "bad_request", f"grids[{i}] must be a map with 'image' or 'data'")
        image = entry.get("image")
        if image is not None and image != b"":
            if not isinstance(image, bytes | bytearray):
                raise APIError(400, "bad_request", f"grids[{i}]: 'image' must be bytes")
            grids.append(_guard(lambda image=image: _decode_one(bytes(image), state)))
        elif entry.get("data") is not None:
            raw = _raw_grid(entry, i, state)
            grids.append(_guard(lambda raw=raw: _check_grid(raw, state)))
        else:
            raise APIError(400, "bad_request", f"grids[{i}] has neither 'image' nor 'data'")
    return grids, renders


def _guard(fn: Callable[[], np.ndarray]) -> np.ndarray | InvalidInputError:
    try:
        return fn()
    except InvalidInputError as exc:
        return exc


def _unpack_msgpack(body: bytes, settings: ServiceSettings) -> Any:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=settings.max_body_bytes,
            max_str_len=1 << 20,
            max_array_len=max(settings.max_grids, 16),
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad input
        raise APIError(400, "bad_msgpack", f"the body is not valid msgpack: {type(exc).__name__}: {exc}") from None


def _unpack_json(body: bytes) -> Any:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise APIError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if isinstance(payload, dict) and isinstance(payload.get("grids"), list):
        for i, entry in enumerate(payload["grids"]):
            for key in ("image", "data"):
                if isinstance(entry, dict) and isinstance(entry.get(key), str):
                    try:
                        entry[key] = base64.b64decode(entry[key], validate=True)
                    except (binascii.Error, ValueError):
                        raise APIError(400, "bad_json", f"grids[{i}].{key} is not valid base64") from None
    return payload


async def parse_request(request: Request, body: bytes, state: ServiceState) -> ParsedRequest:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    accept = request.headers.get("accept", "")
    renders_q = request.query_params.get("return_renders", "false").lower() in ("1", "true", "yes")
    if ctype in IMAGE_TYPES:
        if not body:
            raise APIError(400, "bad_request", "empty body: send one PNG or JPEG grid")
        grid = await run_in_threadpool(_decode_one, body, state)
        return ParsedRequest([grid], renders_q, "image", False)
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=state.settings.max_grids, max_fields=state.settings.max_grids + 8)
        except Exception as exc:  # noqa: BLE001 - malformed multipart bodies raise various errors
            detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
            raise APIError(400, "bad_multipart", f"malformed multipart body: {detail}") from None
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if not files:
            raise APIError(400, "bad_request", "the multipart body holds no files: send each grid as a file part")
        datas = [await f.read() for f in files]
        grids = await run_in_threadpool(lambda: [_guard(lambda d=d: _decode_one(d, state)) for d in datas])
        return ParsedRequest(grids, renders_q, "multipart", False)
    if ctype in MSGPACK_TYPES or ctype == "application/json":
        payload = _unpack_msgpack(body, state.settings) if ctype in MSGPACK_TYPES else _unpack_json(body)
        grids, renders = await run_in_threadpool(_structured_grids, payload, state)
        reply_msgpack = "application/json" not in accept if ctype in MSGPACK_TYPES else "msgpack" in accept
        return ParsedRequest(grids, renders or renders_q, "structured", reply_msgpack)
    raise APIError(
        415,
        "unsupported_media_type",
        f"Content-Type {ctype or '(none)'!r} is not supported; use image/png, image/jpeg, multipart/form-data, "
        "application/msgpack or application/json",
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise APIError(400, "bad_request", "invalid Content-Length header") from None
        if too_big:
            raise APIError(413, "too_large", f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, "too_large", f"the body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let request.form() parse what was already read
    return body


# -- encoding --------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray):
        return base64.b64encode(obj).decode()
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    return obj


def _invalid(exc: Exception, metric: str, status: str = STATUS_INVALID) -> dict[str, Any]:
    return {
        "mrc": None,
        "reward": None,
        "status": status,
        "views": [],
        "metric": metric,
        "version": __version__,
        "error": str(exc),
    }


def error_response(status: int, code: str, detail: str, request_id: str, headers: dict[str, str] | None = None):
    body = {"error": code, "detail": detail, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "X-Request-Id": request_id})


# -- the app ---------------------------------------------------------------------------------------
def create_app(
    settings: ServiceSettings | None = None,
    *,
    model: MRCModel | None = None,
    score_fn: ScoreFn | None = None,
    engine: AsyncEngine | None = None,
) -> FastAPI:
    """The service app. ``model`` / ``score_fn`` may be injected (tests, other engines).

    ``engine``: a remote engine that batches across requests itself (Triton,
    :class:`~.triton_engine.TritonEngine`); each request's grids are forwarded
    at once (:class:`~.batcher.PassThroughBatcher`) and ``/readyz`` asks the
    engine. ``model`` is then used for metadata and input checks only.
    """
    settings = settings or ServiceSettings()
    state = ServiceState(settings, ServiceMetrics(settings.metric.device), engine=engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.model = model or await run_in_threadpool(MRCModel, settings.metric)
        state.metrics.build.info({"version": __version__, "metric": state.model.metric_id, "engine": settings.engine})
        if engine is not None:
            await engine.start()
            state.batcher = PassThroughBatcher(engine, max_queue=settings.max_queue, metrics=state.metrics)
        else:
            state.batcher = DynamicBatcher(
                score_fn or make_score_fn(state.model),
                max_batch=settings.max_batch,
                max_delay_s=settings.max_delay_ms / 1000.0,
                max_queue=settings.max_queue,
                metrics=state.metrics,
            )
        await state.batcher.start()
        state.ready = True
        log.info("ready: %s", state.model.metric_id)
        try:
            yield
        finally:
            state.ready, state.draining = False, True
            await state.batcher.close(drain=True, timeout=settings.drain_timeout_s)
            if engine is not None:
                await engine.close()
            log.info("stopped")

    app = FastAPI(
        title="Carve3D MRC reward service",
        version=__version__,
        description="Scores the 3D consistency of 2x2 multi-view grids (MRC; lower is more consistent). "
        "Message fields follow proto/mrc.proto.",
        lifespan=lifespan,
    )
    app.state.service = state
    _document_request_body(app)
    open_paths = {
        p
        for p, on in (
            ("/healthz", settings.open_health),
            ("/readyz", settings.open_health),
            ("/metrics", settings.open_metrics),
        )
        if on
    }
    token = settings.auth_token.get_secret_value().encode() if settings.auth_token else None

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if len(request_id) > 128:
            request_id = request_id[:128]
        request.state.request_id = request_id
        route = request.url.path if request.url.path in _ROUTES else "other"
        start = time.perf_counter()
        status_code = 500
        state.metrics.in_flight.inc()
        try:
            if token is not None and request.url.path not in open_paths:
                given = request.headers.get("authorization", "")
                scheme, _, value = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
                    status_code = 401
                    return error_response(
                        401,
                        "unauthorized",
                        "missing or wrong bearer token",
                        request_id,
                        {"WWW-Authenticate": 'Bearer realm="mrc"'},
                    )
            try:
                response = await call_next(request)
            except Exception as exc:  # answered here: the keep-alive connection survives
                log.exception("unexpected error")
                response = error_response(500, "internal", f"{type(exc).__name__}: {exc}", request_id)
            response.headers["X-Request-Id"] = request_id
            status_code = response.status_code
            return response
        finally:
            state.metrics.in_flight.dec()
            state.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
            state.metrics.requests.labels(route, str(status_code)).inc()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.code, exc.detail, request.state.request_id, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), request.state.request_id)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, "bad_request", str(exc.errors()[0].get("msg")), request.state.request_id)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, "internal", f"{type(exc).__name__}: {exc}", request.state.request_id)

    @app.post(
        "/mrc",
        summary="Score grids",
        response_model=ScoreResponseModel | GridScoreModel,
        responses={
            200: {
                "description": "image body: one GridScore; multipart/msgpack/json: a ScoreResponse "
                "(msgpack when the request was msgpack, unless Accept: application/json)"
            },
            400: {"model": ErrorModel},
            401: {"model": ErrorModel},
            413: {"model": ErrorModel},
            415: {"model": ErrorModel},
            503: {"model": ErrorModel},
            504: {"model": ErrorModel},
        },
        openapi_extra={
            "parameters": [{"name": "return_renders", "in": "query", "schema": {"type": "boolean"}, "required": False}],
            "requestBody": {
                "required": True,
                "content": {
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
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
        },
    )
    async def score(request: Request) -> Response:
        request_id: str = request.state.request_id
        if not state.ready or state.batcher is None or state.model is None:
            raise APIError(503, "not_ready", "the service is starting or stopping", {"Retry-After": "5"})
        body = await read_body(request, settings.max_body_bytes)
        key = None
        if "x-request-id" in request.headers:  # idempotent retries: same id + same body -> same answer
            key = request_id + ":" + hashlib.sha256(body).hexdigest()[:16]
            cached = _lookup(state, key)
            if cached is not None:
                return _respond(await asyncio.shield(cached), request_id)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if key is not None:
            _remember(state, key, future)
        try:
            reply = await _score_request(request, body, state)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else APIError(503, "cancelled", "cancelled"))
                future.exception()  # mark retrieved
            if key is not None:
                state.responses.pop(key, None)  # errors are not remembered: a retry computes again
            raise
        future.set_result(reply)
        return _respond(reply, request_id)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "version": __version__}

    @app.get("/readyz", summary="Readiness: model loaded and engine running", responses={503: {"model": ErrorModel}})
    async def readyz(request: Request) -> Response:
        ok = state.ready and state.batcher is not None and state.batcher.running
        if not ok:
            detail = "draining" if state.draining else "starting"
            return error_response(503, "not_ready", detail, request.state.request_id, {"Retry-After": "5"})
        if state.engine is not None:
            engine_ok, why = await state.engine.ready()
            if not engine_ok:
                return error_response(503, "engine_unavailable", why, request.state.request_id, {"Retry-After": "2"})
        return JSONResponse({"status": "ready", "metric": state.model.metric_id if state.model else ""})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", summary="Metric id, cameras, limits and version", response_model=InfoModel)
    async def info() -> dict[str, Any]:
        if state.model is None:
            raise APIError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "5"})
        metric = state.model.metric
        return {
            "version": __version__,
            "metric": metric.metric_id,
            "engine": settings.engine,
            "settings": metric.settings.score_fields(),
            "layout": {"name": metric.layout.name, "rows": metric.layout.rows, "cols": metric.layout.cols},
            "cameras": {
                "c2w": metric.cameras.c2w.tolist(),
                "fov_deg": metric.cameras.fov_deg,
                "convention": "OpenGL c2w, world z up; see docs/cameras.md",
            },
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_pixels": settings.max_pixels,
                "max_grids": settings.max_grids,
                "max_batch": settings.max_batch,
                "max_queue": settings.max_queue,
                "request_timeout_s": settings.request_timeout_s,
            },
            "device": metric.settings.device,
        }

    return app


def _document_request_body(app: FastAPI) -> None:
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


_ROUTES = frozenset({"/mrc", "/healthz", "/readyz", "/metrics", "/v1/info"})


async def _score_request(request: Request, body: bytes, state: ServiceState) -> tuple[ParsedRequest, Any]:
    assert state.batcher is not None and state.model is not None
    settings = state.settings
    metric_id = state.model.metric_id
    try:
        parsed = await parse_request(request, body, state)
    except TooManyPixelsError as exc:
        raise APIError(413, "too_large", str(exc)) from None
    except InvalidInputError as exc:
        raise APIError(400, "invalid_image", str(exc)) from None
    if parsed.return_renders and state.engine is not None and not state.engine.supports_renders:
        raise APIError(
            400,
            "renders_unsupported",
            f"return_renders is not available with engine {settings.engine!r}: scores only; "
            "ask an inprocess gateway for re-renders (docs/triton.md)",
        )
    valid = [(i, g) for i, g in enumerate(parsed.grids) if isinstance(g, np.ndarray)]
    try:
        grids = [g for _, g in valid]
        scored = await asyncio.wait_for(state.batcher.submit(grids, parsed.return_renders), settings.request_timeout_s)
    except QueueFullError as exc:
        raise APIError(503, "queue_full", str(exc), {"Retry-After": str(int(exc.retry_after))}) from None
    except EngineUnavailableError as exc:
        retry = str(max(1, round(exc.retry_after)))
        raise APIError(503, "engine_unavailable", str(exc), {"Retry-After": retry}) from None
    except EngineClosedError as exc:
        raise APIError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None
    except TimeoutError:
        raise APIError(504, "timeout", f"scoring took longer than {settings.request_timeout_s:g} s") from None
    results: list[dict[str, Any]] = [g if isinstance(g, dict) else _invalid(g, metric_id) for g in parsed.grids]
    for (i, _), res in zip(valid, scored, strict=True):
        results[i] = _invalid(res, metric_id, STATUS_ERROR) if isinstance(res, Exception) else res
    for res in results:
        state.metrics.grids.labels(res["status"]).inc()
    if parsed.kind == "image":
        single = results[0]
        if single["status"] == STATUS_INVALID:
            raise APIError(400, "invalid_image", single["error"])
        if single["status"] == STATUS_ERROR:
            raise APIError(500, "scoring_failed", single["error"])
    return parsed, results


def _respond(reply: tuple[ParsedRequest, list[dict[str, Any]]], request_id: str) -> Response:
    parsed, results = reply
    if parsed.kind == "image":
        return JSONResponse(to_jsonable(results[0]))
    metric = next((r["metric"] for r in results if r.get("metric")), "")
    payload = {"results": results, "request_id": request_id, "metric": metric}
    if parsed.reply_msgpack:
        return Response(msgpack.packb(payload, use_bin_type=True), media_type="application/msgpack")
    return JSONResponse(to_jsonable(payload))


def _lookup(state: ServiceState, key: str) -> asyncio.Future[Any] | None:
    now = time.monotonic()
    ttl = state.settings.idempotency_ttl_s
    while state.responses:  # expire the oldest
        oldest_key, (stamp, _) = next(iter(state.responses.items()))
        if now - stamp <= ttl:
            break
        state.responses.pop(oldest_key)
    entry = state.responses.get(key)
    return entry[1] if entry else None


def _remember(state: ServiceState, key: str, future: asyncio.Future[Any]) -> None:
    if state.settings.idempotency_max == 0:
        return
    state.responses[key] = (time.monotonic(), future)
    while len(state.responses) > state.settings.idempotency_max:
        state.responses.popitem(last=False)
