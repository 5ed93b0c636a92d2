"""SIGTERM drains: `mrc serve` stops accepting, finishes every accepted request, then exits cleanly."""

from __future__ import annotations

import io
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from carve3d_reward.grid import join_grid, to_uint8_image
from carve3d_reward.layouts import INSTANT3D_2X2

from .serving import serve_process

pytestmark = pytest.mark.slow  # `mrc serve` in a child process


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_finishes_accepted_requests_then_exits(clean_views) -> None:
    grids = [to_uint8_image(g) for g in join_grid(clean_views, INSTANT3D_2X2)]
    bodies = []
    for g in grids:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(g)).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    n = 8
    args = ("--view-size", "64", "--max-batch", "1", "--max-delay-ms", "0", "--carve-samples", "256")
    with serve_process(*args) as (url, proc), ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(
                httpx.post,
                url + "/mrc",
                content=bodies[i % len(bodies)],
                headers={"content-type": "image/png"},
                timeout=120,
            )
            for i in range(n)
        ]
        deadline = time.monotonic() + 30
        while _gauge(url, "mrc_requests_in_flight") < n + 1:  # +1: this /metrics request
            assert time.monotonic() < deadline, "the requests were never all accepted"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = httpx.post(url + "/mrc", content=bodies[0], headers={"content-type": "image/png"}, timeout=5)
            refused = late.status_code == 503
        except httpx.TransportError:
            refused = True
        assert refused, "a new request was accepted after SIGTERM"
        answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * n
        assert all(a.json()["status"] == "ok" for a in answers)
        assert proc.wait(timeout=60) == 0
        assert not any(f.exception() for f in futures)
