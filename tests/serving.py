"""Run an ASGI app or `mrc serve` on a loopback port for the duration of a test."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from carve3d_reward.errors import MRCError
from carve3d_reward.service.launch import free_port, serve_subprocess

__all__ = ["free_port", "serve_app", "serve_process"]


@contextlib.contextmanager
def serve_app(app, *, startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def serve_process(
    *args: str, env: dict[str, str] | None = None, startup_timeout: float = 90.0, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``mrc serve`` as a child process (output in a temporary log); yields its URL and the process."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        try:
            with serve_subprocess(*args, port=port, log=log, env=env, startup_timeout=startup_timeout) as served:
                yield served
        except MRCError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text() if log.exists() else ''}") from None
