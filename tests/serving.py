"""Run an ASGI app or `mrc serve` on a loopback port for the duration of a test."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from carve3d_reward.errors import MRCError
from carve3d_reward.service.launch import free_port, serve_subprocess
from carve3d_reward.service.server import server_config

__all__ = ["free_port", "serve_app", "serve_process"]


@contextlib.contextmanager
def serve_app(app, *, port: int = 0, force_exit: bool = False, startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on ``127.0.0.1`` in a background thread; yields its base URL.

    The socket is bound before uvicorn starts (no port race; ``port`` may be a port just freed, for
    restart tests). ``force_exit`` ends without waiting for handlers still running at the end.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = server_config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = force_exit
        thread.join(timeout=30)
        sock.close()


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
