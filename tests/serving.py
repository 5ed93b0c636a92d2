"""Run an ASGI app or `mrc serve` on a loopback port for the duration of a test."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """Run ``mrc serve`` as a child process; yields its base URL and the process."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("mrc")
    proc = subprocess.Popen(
        [str(exe), "serve", "--port", str(port), "--log-level", "warning", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mrc serve exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("mrc serve did not become ready")
        time.sleep(0.1)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
