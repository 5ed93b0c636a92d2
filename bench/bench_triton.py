"""Grids/s and p50/p99 latency of the reward service: in-process engine vs Triton engine.

Starts ``mrc serve --engine inprocess`` and then ``mrc serve --engine triton``
(PyTriton started by ``mrc serve``) as child processes on 127.0.0.1, with the
same metric settings and batching settings, and drives each with an async
httpx client: msgpack raw-pixel requests, one grid each, at each concurrency
(default 1 and 16). Prints grids/s, p50 and p99 latency, the non-200 count,
and the mean batch size the engine ran (the gateway's ``mrc_batch_size`` for
in-process; Triton's ``nv_inference_count / nv_inference_exec_count`` for
Triton). Every loop is bounded in count and in time.

    .venv/bin/python bench/bench_triton.py                     # 96 requests per point, 128 px views
    .venv/bin/python bench/bench_triton.py --quick             # 32 requests per point, 64 px views
    .venv/bin/python bench/bench_triton.py --json out/bench_triton.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np

from carve3d_reward.pixels import to_uint8
from carve3d_reward.service.launch import free_port, serve_subprocess
from carve3d_reward.tools.synthetic import make_grids


@contextlib.contextmanager
def mrc_serve(engine: str, args: argparse.Namespace, timeout: float = 240.0) -> Iterator[tuple[str, str | None]]:
    """``mrc serve --engine ENGINE`` on free loopback ports; yields the gateway URL and Triton's metrics URL."""
    metrics_port = free_port()
    flags = ["--engine", engine, "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    flags += ["--view-size", str(args.view_size), "--device", "cpu"]
    if engine == "triton":
        flags += ["--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port())]
        flags += ["--triton-metrics-port", str(metrics_port), "--triton-instances", str(args.triton_instances)]
    with serve_subprocess(*flags, startup_timeout=timeout) as (url, _):
        yield url, (f"http://127.0.0.1:{metrics_port}/metrics" if engine == "triton" else None)


def _sum(text: str, pattern: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{pattern}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def batch_counters(url: str, triton_metrics: str | None) -> tuple[float, float]:
    """(grids scored, batches run) so far, from the engine's own counters."""
    if triton_metrics is not None:
        text = httpx.get(triton_metrics, timeout=10).text
        return _sum(text, "nv_inference_count"), _sum(text, "nv_inference_exec_count")
    text = httpx.get(url + "/metrics", timeout=10).text
    return _sum(text, "mrc_batch_size_sum"), _sum(text, "mrc_batch_size_count")


async def drive(url: str, bodies: list[bytes], concurrency: int, max_seconds: float) -> dict[str, Any]:
    """Send every body once from ``concurrency`` workers; per-request latency, grids/s and non-200s."""
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"content-type": "application/msgpack"}
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while time.monotonic() < deadline:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            try:
                r = await client.post(url + "/mrc", content=body, headers=headers)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1

    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000.0 if latencies else np.asarray([np.nan])
    return {
        "requests": len(latencies) + failures,
        "non_200": failures,
        "grids_per_s": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 requests per point, 64 px views")
    parser.add_argument("--requests", type=int, default=96, help="requests (one grid each) per point")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client concurrencies")
    parser.add_argument("--view-size", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--triton-instances", type=int, default=1)
    parser.add_argument("--engines", default="inprocess,triton")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time limit per point")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.view_size = 32, 64
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    pool = make_grids(16, 0, view_size=args.view_size)
    grids = to_uint8(pool.permute(0, 2, 3, 1)).numpy()
    bodies = [
        msgpack.packb({"grids": [{"data": g.tobytes(), "shape": list(g.shape), "dtype": "uint8"}]}, use_bin_type=True)
        for g in grids
    ]
    rows: list[dict[str, Any]] = []
    for engine in args.engines.split(","):
        with mrc_serve(engine, args) as (url, triton_metrics):
            asyncio.run(drive(url, bodies[:4], 2, 60.0))  # warm-up
            for c in concurrencies:
                grids0, batches0 = batch_counters(url, triton_metrics)
                body_list = [bodies[i % len(bodies)] for i in range(args.requests)]
                row = {"engine": engine, "concurrency": c, **asyncio.run(drive(url, body_list, c, args.max_seconds))}
                grids1, batches1 = batch_counters(url, triton_metrics)
                row["mean_batch"] = (grids1 - grids0) / (batches1 - batches0) if batches1 > batches0 else 0.0
                rows.append(row)
                print(
                    f"{engine:>9}  c={c:<3} {row['grids_per_s']:7.2f} grids/s  p50 {row['p50_ms']:8.1f} ms  "
                    f"p99 {row['p99_ms']:8.1f} ms  mean batch {row['mean_batch']:5.2f}  non-200 {row['non_200']}",
                    flush=True,
                )
    config = {k: getattr(args, k) for k in ("requests", "view_size", "max_batch", "max_delay_ms", "triton_instances")}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config, "cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    return 1 if any(r["non_200"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
