"""A request's memory is a function of the limits, not of how well its images compress.

Eight 4096x4096 all-white PNGs are about 450 kB in one multipart request but
hold 134 M pixels; before the decoder reduced each grid to the working
resolution as it decoded it, this request took about 4 GB of the server
(``bench/bench_service_memory.py``). Measured from the server process itself
(``VmHWM`` in ``/proc/<pid>/status``, reset after a warm-up request), never
timed.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from carve3d_reward.pixels import to_uint8
from carve3d_reward.tools.synthetic import make_grids

from .serving import serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SIDE = 4096
#: docs/api.md: a decode holds at most about 24 bytes per pixel of the grid being decoded, one grid at a time per
#: request; plus the scoring of the request's grids at the working resolution (tens of MiB here).
DECODE_BYTES_PER_PIXEL = 24
SCORING_SLACK_MIB = 128


def _kib(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_many_compressible_huge_grids_stay_under_the_documented_peak():
    white = _png(np.full((SIDE, SIDE, 3), 255, np.uint8))
    warm = [to_uint8(g) for g in make_grids(8, seed=2, view_size=64).permute(0, 2, 3, 1).numpy()]
    args = ("--view-size", "64", "--carve-resolution", "32", "--carve-samples", "64")
    with serve_process(*args) as (url, proc):
        r = httpx.post(url + "/mrc", files=[("g", (f"{i}.png", _png(g), "image/png")) for i, g in enumerate(warm)])
        assert r.status_code == 200, r.text
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # peak := now
        before = _kib(proc.pid, "VmRSS")
        files = [("g", (f"{i}.png", white, "image/png")) for i in range(8)]
        r = httpx.post(url + "/mrc", files=files, timeout=240)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == ["empty_view"] * 8  # decoded and scored, not refused
        peak_mib = (_kib(proc.pid, "VmHWM") - before) / 1024
        deadline = time.monotonic() + 30  # idle for a second, the service hands freed memory back to the OS
        while (held_mib := (_kib(proc.pid, "VmRSS") - before) / 1024) >= 100 and time.monotonic() < deadline:
            time.sleep(0.2)
    bound_mib = DECODE_BYTES_PER_PIXEL * SIDE * SIDE / 2**20 + SCORING_SLACK_MIB
    size_kb = 8 * len(white) / 1e3
    print(f"\n8 x {SIDE}^2 white PNGs ({size_kb:.0f} kB): peak +{peak_mib:.0f} MiB, held +{held_mib:.0f} MiB")
    assert peak_mib < bound_mib, f"peak grew by {peak_mib:.0f} MiB, more than the documented {bound_mib:.0f} MiB"
    assert held_mib < 100, f"{held_mib:.0f} MiB still held after the request"
