"""The HTTP API: ``POST /mrc`` plus health, readiness, metrics and info.

A thin shell: a request is decoded into grids (:mod:`.requests`), scored by
the batcher, and the results are encoded back; repeated request ids are
answered from :class:`.idempotency.IdempotencyCache`. Every error is a JSON
``{"error", "detail", "request_id"}`` with a 4xx/5xx status; no input can
crash the worker or lose another request. Messages follow ``proto/mrc.proto``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InvalidInputError
from ..model import MRCModel
from ..scores import GridScore, Status
from ..wire import REQUEST_ID_RULE, is_valid_request_id
from .batcher import (
    AsyncEngine,
    DynamicBatcher,
    EngineClosedError,
    EngineUnavailableError,
    PassThroughBatcher,
    QueueFullError,
    RequestTooLargeError,
    ScoreFn,
)
from .errors import APIError, error_response
from .idempotency import IdempotencyCache
from .metrics import ServiceMetrics
from .requests import ParsedRequest, RequestDecoder, RequestOptions, read_body, request_options
from .responses import respond
from .schemas import SCORE_OPENAPI, ErrorModel, GridScoreModel, InfoModel, ScoreResponseModel, document_request_body
from .settings import ServiceSettings

log = logging.getLogger("carve3d_reward.service")


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics
    responses: IdempotencyCache
    model: MRCModel | None = None
    decoder: RequestDecoder | None = None
    batcher: DynamicBatcher | PassThroughBatcher | None = None
    engine: AsyncEngine | None = None  # a remote engine that batches itself (Triton)
    ready: bool = False
    draining: bool = False


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
    state = ServiceState(
        settings,
        ServiceMetrics(settings.metric.device),
        IdempotencyCache(settings.idempotency_ttl_s, settings.idempotency_max),
        engine=engine,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.model = model or await run_in_threadpool(MRCModel, settings.metric)
        metric = state.model.metric
        state.decoder = RequestDecoder(settings, metric.layout, metric.settings.view_size)
        state.metrics.build.info({"version": __version__, "metric": state.model.metric_id, "engine": settings.engine})
        limits = {"max_queue": settings.max_queue, "max_queue_pixels": settings.max_queue_pixels}
        if engine is not None:
            await engine.start()
            state.batcher = PassThroughBatcher(engine, metrics=state.metrics, **limits)
        else:
            loaded = state.model
            state.batcher = DynamicBatcher(
                score_fn or (lambda grids, renders: loaded.score_grids(grids, return_renders=renders)),
                max_batch=settings.max_batch,
                max_delay_s=settings.max_delay_ms / 1000.0,
                metrics=state.metrics,
                **limits,
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
        description="Scores the 3D consistency of multi-view grids (MRC; lower is more consistent). "
        "Message fields follow proto/mrc.proto.",
        lifespan=lifespan,
    )
    app.state.service = state
    document_request_body(app)
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
        given_id = request.headers.get("x-request-id")
        request_id = given_id if is_valid_request_id(given_id) else uuid.uuid4().hex
        request.state.request_id = request_id
        route = request.url.path if request.url.path in _ROUTES else "other"
        start = time.perf_counter()
        status_code = 500
        state.metrics.in_flight.inc()
        try:
            if given_id is not None and given_id != request_id:
                status_code = 400
                detail = f"X-Request-Id must be {REQUEST_ID_RULE} (got {len(given_id)} characters)"
                return error_response(400, "bad_request_id", detail, request_id)
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
            except Exception:  # answered here: the keep-alive connection survives
                log.exception("unexpected error (request %s)", request_id)
                response = error_response(500, "internal", _INTERNAL, request_id)
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
        log.exception("unexpected error (request %s)", request.state.request_id)
        return error_response(500, "internal", _INTERNAL, request.state.request_id)

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
        openapi_extra=SCORE_OPENAPI,
    )
    async def score(request: Request) -> Response:
        request_id: str = request.state.request_id
        if not state.ready or state.batcher is None or state.model is None:
            raise APIError(503, "not_ready", "the service is starting or stopping", {"Retry-After": "5"})
        options = request_options(request)
        body = await read_body(request, settings.max_body_bytes)
        key = None
        if "x-request-id" in request.headers:  # idempotent retries: the same request -> the same answer
            key = IdempotencyCache.key(request_id, options, body)
            cached = state.responses.get(key)
            if cached is not None:
                return respond(await asyncio.shield(cached), request_id)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if key is not None:
            state.responses.put(key, future)
        try:
            reply = await _score_request(request, body, options, state)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else APIError(503, "cancelled", "cancelled"))
                future.exception()  # mark retrieved
            if key is not None:
                state.responses.forget(key)  # errors are not remembered: a retry computes again
            raise
        future.set_result(reply)
        return respond(reply, request_id)

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
            "limits": {name: getattr(settings, name) for name in _LIMITS},
            "device": metric.settings.device,
        }

    return app


_INTERNAL = "internal error; the server's log has the cause under this request id"
_LIMITS = (
    "max_body_bytes",
    "max_pixels",
    "max_request_pixels",
    "max_grids",
    "max_batch",
    "max_queue",
    "max_queue_pixels",
    "decode_threads",
    "request_timeout_s",
)


_ROUTES = frozenset({"/mrc", "/healthz", "/readyz", "/metrics", "/v1/info"})


async def _score_request(
    request: Request, body: bytes, options: RequestOptions, state: ServiceState
) -> tuple[ParsedRequest, list[GridScore]]:
    assert state.batcher is not None and state.model is not None and state.decoder is not None
    settings = state.settings
    metric_id = state.model.metric_id
    parsed = await state.decoder.decode(request, body, options)
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
    except RequestTooLargeError as exc:
        raise APIError(413, "too_large", str(exc)) from None
    except QueueFullError as exc:
        raise APIError(503, "queue_full", str(exc), {"Retry-After": str(int(exc.retry_after))}) from None
    except EngineUnavailableError as exc:
        retry = str(max(1, round(exc.retry_after)))
        raise APIError(503, "engine_unavailable", str(exc), {"Retry-After": retry}) from None
    except EngineClosedError as exc:
        raise APIError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None
    except TimeoutError:
        raise APIError(504, "timeout", f"scoring took longer than {settings.request_timeout_s:g} s") from None
    results = [GridScore.invalid(str(g), metric_id) if isinstance(g, InvalidInputError) else None for g in parsed.grids]
    for (i, _), res in zip(valid, scored, strict=True):
        if isinstance(res, Exception):  # the traceback is in the server's log
            message = f"the server failed to score this grid ({res}); retrying may help"
            res = GridScore.invalid(message, metric_id, Status.ERROR)
        results[i] = res
    answered = [r for r in results if r is not None]
    for res in answered:
        state.metrics.grids.labels(res.status.value).inc()
    if parsed.options.kind == "image" and answered[0].status is Status.ERROR:
        raise APIError(500, "scoring_failed", answered[0].error)
    return parsed, answered
