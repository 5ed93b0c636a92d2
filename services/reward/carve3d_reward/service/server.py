"""``mrc serve``'s process: the app under uvicorn, and for engine ``triton`` the Triton it supervises.

uvicorn answers a request it cannot parse (a bad request line, header or
chunked framing; headers over its size limit) with a plain-text 400 before
the app sees it. :class:`JSONErrorH11Protocol` makes that answer the service's
JSON error like every other, so a client parses one error format.

Signals: uvicorn drains accepted requests on SIGTERM, then re-raises it; a
handler of ours turns that into a clean exit 0. With a Triton started here
(PyTriton, a ``tritonserver`` child process), SIGTERM unwinds through the
code that stops it, so no server outlives this process, and a Triton that
dies on its own drains the gateway and exits 1 (the supervisor restarts it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..model import MRCModel
from .errors import error_body
from .settings import ServiceSettings


class JSONErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the service's JSON 400 for malformed HTTP."""

    def send_400_response(self, msg: str) -> None:
        request_id = uuid.uuid4().hex
        detail = "malformed HTTP request: its request line, headers or body framing cannot be parsed"
        body = json.dumps(error_body("bad_http", detail, request_id)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response had already begun on this connection: nothing more can be said on it
        self.transport.close()


def server_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config for the service (``kwargs`` as for :class:`uvicorn.Config`)."""
    return uvicorn.Config(app, http=JSONErrorH11Protocol, **kwargs)


def serve(settings: ServiceSettings, model: MRCModel, *, log_level: str = "info") -> int:
    """Run the service until SIGTERM (exit 0) or until a Triton started here dies (exit 1)."""
    if settings.engine == "inprocess":
        print(f"mrc serve: {model.metric_id} on http://{settings.host}:{settings.port}", file=sys.stderr)
        signal.signal(signal.SIGTERM, lambda *_: None)
        _run_gateway(settings, model, log_level)
        return 0
    return _serve_with_triton(settings, model, log_level)


def _run_gateway(settings: ServiceSettings, model: MRCModel, log_level: str, **app_kwargs: Any) -> None:
    from .app import create_app

    config = server_config(
        create_app(settings, model=model, **app_kwargs),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        log_level=log_level,
        access_log=log_level == "debug",
    )
    uvicorn.Server(config).run()


def _serve_with_triton(settings: ServiceSettings, model: MRCModel, log_level: str) -> int:
    """Engine ``triton``: the gateway forwards to Triton's model ``mrc`` (docs/triton.md); with no
    ``triton_url`` Triton is started here and stopped on the way out."""
    from ..triton.binding import MRCTriton, check_environment
    from .triton_engine import TritonEngine

    triton: MRCTriton | None = None
    url = settings.triton_url
    stopping, died = threading.Event(), threading.Event()
    if url is None:
        check_environment()

        def stop(signum: int, _frame: object) -> None:
            raise SystemExit(1 if died.is_set() else 0)  # unwind through `finally`, which stops tritonserver

        signal.signal(signal.SIGTERM, stop)
        log_file = None
        if log_level not in ("debug", "info"):  # Triton's own log, which is chatty, goes to a file
            log_file = Path(tempfile.gettempdir()) / f"mrc-triton-{os.getpid()}.log"
        triton = MRCTriton(settings, models=[model], log_file=log_file).start()
        url = triton.grpc_url
        threading.Thread(target=_watch, args=(triton, stopping, died), name="mrc-triton-watch", daemon=True).start()
        print(
            f"mrc serve: triton (PyTriton) grpc {triton.grpc_url}, http {triton.http_url}, "
            f"metrics {triton.metrics_url}" + (f", log {log_file}" if log_file else ""),
            file=sys.stderr,
        )
    try:
        engine = TritonEngine(
            url, metric_id=model.metric_id, max_batch=settings.max_batch, timeout_s=settings.request_timeout_s
        )
        print(f"mrc serve: {model.metric_id} on http://{settings.host}:{settings.port} (triton {url})", file=sys.stderr)
        if triton is None:  # an external Triton: SIGTERM is only the gateway's drain, as for inprocess
            signal.signal(signal.SIGTERM, lambda *_: None)
        _run_gateway(settings, model, log_level, engine=engine)
    finally:
        stopping.set()
        if triton is not None:
            triton.stop()
    return 1 if died.is_set() else 0


def _watch(server: Any, stopping: threading.Event, died: threading.Event) -> None:
    """Triton gone on its own: drain the gateway and exit 1."""
    while not stopping.wait(1.0):
        if not server.is_alive() and not stopping.is_set():
            died.set()
            print("mrc serve: error: triton stopped unexpectedly; shutting down", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)
            return
