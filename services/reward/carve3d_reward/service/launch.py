"""Run ``mrc serve`` as a child process: for the demo, benchmarks, tests and ``make up``.

One place that knows how to pick a loopback port, wait for readiness and stop
the service the way an orchestrator would (SIGTERM: drain, then exit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx

from ..errors import MRCError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, log: str = "") -> None:
    """Poll ``/readyz`` until it answers 200; fail clearly if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise MRCError(f"the reward service exited at start-up (exit {proc.returncode}){log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise MRCError(f"the reward service was not ready after {timeout:.0f} s{log}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM (the service drains), then SIGKILL if it is still there after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@contextlib.contextmanager
def serve_subprocess(
    *args: str,
    port: int | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mrc serve --host 127.0.0.1 --port P *args`` until the block ends; yields ``(url, process)``.

    Output goes to ``log`` (or is discarded); the service is stopped with
    SIGTERM when the block exits.
    """
    port = port or free_port()
    exe = Path(sys.executable).with_name("mrc")
    out: IO[str] | int = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("w")
    try:
        proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    finally:
        if not isinstance(out, int):
            out.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, startup_timeout, f"; see {log}" if log else "")
        yield url, proc
    finally:
        stop(proc)
