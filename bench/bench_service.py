"""Throughput, batching gain, latency and a load test of the MRC reward service over loopback HTTP.

Starts ``mrc serve`` as a child process on 127.0.0.1 (one at a time) and drives it with an
async httpx client sending msgpack raw-pixel requests, one grid per request, the way
``carve3d_reward.client`` does (or PNG bodies with ``--wire png``). Parts:

  a. grids/s at each concurrency (default 1, 16, 64) through HTTP, and the in-process
     batched metric (``MRCModel.score`` on batches of ``max_batch``) on the same machine
     in the same run -> the ratio HTTP / in-process;
  b. batching gain: a ``max_batch 16`` server vs a ``max_batch 1`` server under the same
     load (concurrency 16) -> the ratio;
  c. p50 / p99 latency at each concurrency (printed with a);
  d. a load run (default 2,000 requests at concurrency 64 on small grids) counting 200s,
     4xx, 5xx, connection errors, timeouts and lost requests (sent - answered); the script
     exits 1 unless there is no 5xx, nothing lost and every 200 holds a score.

Every loop is bounded in count and in time. The metric uses its default settings except
``view_size``.

    .venv/bin/python bench/bench_service.py --quick           # smoke run, about a minute
    .venv/bin/python bench/bench_service.py                   # a, b, c (256x256 grids) and d
    .venv/bin/python bench/bench_service.py --parts d         # only the load run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import torch
from PIL import Image

from carve3d_reward.model import MRCModel
from carve3d_reward.pixels import to_uint8
from carve3d_reward.scores import Status
from carve3d_reward.service.launch import free_port, serve_subprocess
from carve3d_reward.settings import MetricSettings
from carve3d_reward.tools.synthetic import make_grids

SCORED = (Status.OK, Status.EMPTY_VIEW)


# -- the server --------------------------------------------------------------------------------------
@contextlib.contextmanager
def mrc_server(
    *, view_size: int, max_batch: int, engine: str = "inprocess", startup_timeout: float = 180.0
) -> Iterator[tuple[str, dict]]:
    """``mrc serve`` on a free loopback port (settings through ``MRC_*``); yields its URL and /v1/info."""
    env = {"MRC_VIEW_SIZE": str(view_size), "MRC_MAX_BATCH": str(max_batch), "MRC_DEVICE": "cpu", "MRC_ENGINE": engine}
    if engine == "triton":  # mrc serve starts Triton (PyTriton) itself, on free ports
        for name in ("HTTP", "GRPC", "METRICS"):
            env[f"MRC_TRITON_{name}_PORT"] = str(free_port())
    with serve_subprocess(env=env, startup_timeout=startup_timeout) as (url, _):
        info = httpx.get(url + "/v1/info", timeout=10.0).json()
        got_view, got_batch = info["settings"].get("view_size"), info["limits"].get("max_batch")
        if got_view != view_size or got_batch != max_batch:
            raise RuntimeError(
                f"server runs view_size={got_view}, max_batch={got_batch}; asked {view_size}, {max_batch}"
            )
        yield url, info


def server_batch_stats(url: str) -> dict[str, float]:
    """Mean batch size and 5xx count from the server's own /metrics."""
    text = httpx.get(url + "/metrics", timeout=10.0).text

    def value(pattern: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{pattern} (\S+)$", text, re.M))

    batches = value(r"mrc_batch_size_count")
    grids = value(r"mrc_batch_size_sum")
    return {
        "batches": batches,
        "mean_batch": grids / batches if batches else 0.0,
        "server_5xx": value(r'mrc_requests_total\{[^}]*code="5\d\d"[^}]*\}'),
        "batch_failures": value(r"mrc_batch_failures_total"),
    }


# -- request bodies ----------------------------------------------------------------------------------
def grid_pool(n: int, view_size: int, seed: int = 0) -> np.ndarray:
    """``n`` synthetic consistent grids, ``uint8 [n, 2*view_size, 2*view_size, 3]``."""
    grids = make_grids(n, seed, view_size=view_size)
    return to_uint8(grids.permute(0, 2, 3, 1)).numpy()


def encode_bodies(pool: np.ndarray, wire: str) -> tuple[list[bytes], dict[str, str]]:
    """One request body per grid, as the real client sends them, and the headers."""
    if wire == "png":
        bodies = []
        for g in pool:
            buf = io.BytesIO()
            Image.fromarray(g).save(buf, format="PNG")
            bodies.append(buf.getvalue())
        return bodies, {"content-type": "image/png"}
    bodies = [
        msgpack.packb(
            {"grids": [{"data": g.tobytes(), "shape": [int(g.shape[0]), int(g.shape[1]), 3], "dtype": "uint8"}]},
            use_bin_type=True,
        )
        for g in pool
    ]
    return bodies, {"content-type": "application/msgpack", "accept": "application/msgpack"}


def _scored(response: httpx.Response, wire: str) -> bool:
    """Whether a 200 answer holds exactly one score."""
    try:
        if wire == "png":
            return response.json().get("status") in SCORED
        payload = msgpack.unpackb(response.content, raw=False)
        results = payload["results"]
        return len(results) == 1 and results[0]["status"] in SCORED and isinstance(results[0]["mrc"], float)
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException):
        return False


# -- load generation ---------------------------------------------------------------------------------
@dataclass
class LoadResult:
    concurrency: int
    requests: int
    sent: int = 0
    answered: int = 0
    ok_200: int = 0
    bad_200: int = 0  # a 200 whose body is not one score
    status_4xx: int = 0
    status_5xx: int = 0
    other_status: int = 0
    connection_errors: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    @property
    def grids_per_s(self) -> float:
        return self.ok_200 / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "latencies"}
        out.update(lost=self.lost, grids_per_s=self.grids_per_s, p50_s=self.pct(50), p99_s=self.pct(99))
        return out


async def run_load(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    *,
    wire: str,
    requests: int,
    concurrency: int,
    time_limit_s: float,
    request_timeout_s: float,
) -> LoadResult:
    """``requests`` POSTs from ``concurrency`` workers; no new request after ``time_limit_s``."""
    result = LoadResult(concurrency, requests)
    statuses: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    issued = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(request_timeout_s, connect=30.0)
    start = time.perf_counter()
    deadline = start + time_limit_s

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                body = bodies[issued % len(bodies)]
                issued += 1
                result.sent += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(url + "/mrc", content=body, headers=headers)
                except httpx.TimeoutException as exc:
                    result.timeouts += 1
                    errors[type(exc).__name__] += 1
                    continue
                except httpx.HTTPError as exc:  # connection refused / reset / closed without an answer
                    result.connection_errors += 1
                    errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                    continue
                result.answered += 1
                statuses[response.status_code] += 1
                code = response.status_code
                if code == 200:
                    if _scored(response, wire):
                        result.ok_200 += 1
                        result.latencies.append(time.perf_counter() - t0)
                    else:
                        result.bad_200 += 1
                elif 400 <= code < 500:
                    result.status_4xx += 1
                elif code >= 500:
                    result.status_5xx += 1
                    errors[f"{code}: {response.text[:100]}"] += 1
                else:
                    result.other_status += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    result.statuses, result.errors = dict(statuses), dict(errors)
    return result


def load(url: str, bodies: list[bytes], headers: dict[str, str], args: argparse.Namespace, **kw: Any) -> LoadResult:
    return asyncio.run(run_load(url, bodies, headers, wire=args.wire, request_timeout_s=args.request_timeout, **kw))


def warm_up(url: str, bodies: list[bytes], headers: dict[str, str], args: argparse.Namespace, n: int) -> None:
    """``n`` concurrent requests, not counted (the first batch of a size is slower)."""
    res = load(url, bodies, headers, args, requests=n, concurrency=n, time_limit_s=args.level_timeout)
    if res.ok_200 != n:
        raise RuntimeError(f"warm-up failed: {res.summary()}")


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, concurrency * args.rounds)


# -- in-process baseline ------------------------------------------------------------------------------
def inprocess_grids_per_s(pool: np.ndarray, view_size: int, max_batch: int, repeats: int, time_limit_s: float) -> float:
    model = MRCModel(MetricSettings(view_size=view_size, device="cpu"))
    batch = np.stack([pool[i % len(pool)] for i in range(max_batch)])
    model.score(batch)  # warm-up
    done, start = 0, time.perf_counter()
    for _ in range(repeats):
        model.score(batch)
        done += len(batch)
        if time.perf_counter() - start > time_limit_s:
            break
    return done / (time.perf_counter() - start)


# -- report ------------------------------------------------------------------------------------------
def _row(label: str, r: LoadResult, extra: str = "") -> str:
    return (
        f"  {label:<22} {r.concurrency:>5} {r.ok_200:>5}/{r.sent:<5} {r.grids_per_s:>9.2f} "
        f"{r.pct(50):>8.2f} {r.pct(99):>8.2f}  {extra}"
    )


HEADER = f"  {'':<22} {'conc':>5} {'ok/sent':>11} {'grids/s':>9} {'p50 s':>8} {'p99 s':>8}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny grids and few requests")
    parser.add_argument("--parts", default="a,b,c,d", help="which parts to run (a,b,c,d; c comes with a)")
    parser.add_argument("--view-size", type=int, default=128, help="view size of parts a-c (grid = 2x; default 128)")
    parser.add_argument("--load-view-size", type=int, default=64, help="view size of the load run d (default 64)")
    parser.add_argument("--concurrency", default="1,16,64", help="concurrency levels of part a")
    parser.add_argument("--max-batch", type=int, default=16, help="server max_batch (and in-process batch)")
    parser.add_argument("--rounds", type=int, default=4, help="requests per level = max(min, concurrency x rounds)")
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--level-timeout", type=float, default=300.0, help="no new request after this (s)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="client timeout per request (s)")
    parser.add_argument("--pool", type=int, default=16, help="distinct grids cycled through")
    parser.add_argument("--inprocess-repeats", type=int, default=3)
    parser.add_argument("--load-requests", type=int, default=2000)
    parser.add_argument("--load-concurrency", type=int, default=64)
    parser.add_argument("--load-timeout", type=float, default=900.0, help="no new load request after this (s)")
    parser.add_argument("--wire", choices=["msgpack", "png"], default="msgpack")
    parser.add_argument(
        "--engine", default="inprocess", help="engine(s) of part a: inprocess, triton or inprocess,triton"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.view_size, args.load_view_size = 32, 32
        args.concurrency, args.rounds, args.min_requests, args.pool = "1,16,64", 2, 4, 4
        args.inprocess_repeats, args.load_requests, args.level_timeout, args.load_timeout = 1, 300, 120.0, 180.0
    parts = set(args.parts.split(","))
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
    }
    failed = False
    t_all = time.perf_counter()

    print(f"MRC service benchmark{' (quick)' if args.quick else ''}: loopback HTTP, {args.wire} wire, one grid/request")
    print(f"  cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")

    if parts & {"a", "b", "c"}:
        vs = args.view_size
        pool = grid_pool(args.pool, vs)
        bodies, headers = encode_bodies(pool, args.wire)

        def load_at_16(url: str) -> LoadResult:
            """The batching-gain load (part b): the same requests at concurrency 16 against either server."""
            return load(
                url,
                bodies,
                headers,
                args,
                requests=requests_for(16, args),
                concurrency=16,
                time_limit_s=args.level_timeout,
            )

        print(
            f"\n[a/c] {2 * vs}x{2 * vs} grids (view_size {vs}), max_batch {args.max_batch}, {len(bodies[0])} B/request"
        )
        engines = args.engine.split(",")
        by_engine: dict[str, dict[int, LoadResult]] = {}
        for engine in engines:
            results: dict[int, LoadResult] = {}
            with mrc_server(view_size=vs, max_batch=args.max_batch, engine=engine) as (url, info):
                print(f"  server ({engine} engine): {info['metric']} (version {info['version']})")
                warm_up(url, bodies, headers, args, args.max_batch)
                print(HEADER)
                for c in levels if parts & {"a", "c"} else []:
                    r = load(
                        url,
                        bodies,
                        headers,
                        args,
                        requests=requests_for(c, args),
                        concurrency=c,
                        time_limit_s=args.level_timeout,
                    )
                    results[c] = r
                    print(_row(f"HTTP {engine} max_batch={args.max_batch}", r), flush=True)
                if "b" in parts and engine == engines[0]:
                    b16 = load_at_16(url)
                stats = server_batch_stats(url)
                print(f"  server: {stats['batches']:.0f} batches, mean batch {stats['mean_batch']:.1f} grids")
            by_engine[engine] = results
            failed |= any(r.status_5xx or r.lost or r.bad_200 for r in results.values())
        if parts & {"a", "c"}:
            inproc = inprocess_grids_per_s(pool, vs, args.max_batch, args.inprocess_repeats, args.level_timeout)
            print(f"  in-process MRCModel.score, batches of {args.max_batch}: {inproc:.2f} grids/s")
            for engine, results in by_engine.items():
                for c, r in results.items():
                    print(f"  HTTP ({engine})/in-process at concurrency {c:>3}: {r.grids_per_s / inproc:.2f}")
            report["a"] = {
                "inprocess_grids_per_s": inproc,
                "http": {e: {c: r.summary() for c, r in res.items()} for e, res in by_engine.items()},
            }
        if "b" in parts:
            with mrc_server(view_size=vs, max_batch=1) as (url, _):
                warm_up(url, bodies, headers, args, 2)
                b1 = load_at_16(url)
            print(f"\n[b] batching gain at concurrency 16 (same load, two servers)\n{HEADER}")
            print(_row(f"max_batch={args.max_batch}", b16))
            print(_row("max_batch=1", b1))
            gain = b16.grids_per_s / b1.grids_per_s if b1.grids_per_s else float("nan")
            print(f"  batching gain (grids/s, max_batch={args.max_batch} / max_batch=1): {gain:.2f}x")
            report["b"] = {"max_batch_n": b16.summary(), "max_batch_1": b1.summary(), "gain": gain}
            failed |= any(r.status_5xx or r.lost or r.bad_200 for r in (b16, b1))

    if "d" in parts:
        vs = args.load_view_size
        pool = grid_pool(args.pool, vs, seed=1)
        bodies, headers = encode_bodies(pool, args.wire)
        n, c = args.load_requests, args.load_concurrency
        print(f"\n[d] load: {n} requests at concurrency {c}, {2 * vs}x{2 * vs} grids, max_batch {args.max_batch}")
        with mrc_server(view_size=vs, max_batch=args.max_batch) as (url, _):
            warm_up(url, bodies, headers, args, args.max_batch)
            r = load(url, bodies, headers, args, requests=n, concurrency=c, time_limit_s=args.load_timeout)
            stats = server_batch_stats(url)
            ready = httpx.get(url + "/readyz", timeout=10.0).status_code
        print(
            f"  sent {r.sent}, answered {r.answered}: 200 {r.ok_200} (+{r.bad_200} malformed), 4xx {r.status_4xx}, "
            f"5xx {r.status_5xx}, other {r.other_status}, connection errors {r.connection_errors}, "
            f"timeouts {r.timeouts}, lost {r.lost}"
        )
        print(
            f"  {r.seconds:.1f} s; server: {stats['batches']:.0f} batches, mean batch {stats['mean_batch']:.1f}, "
            f"server-side 5xx {stats['server_5xx']:.0f}, batch failures {stats['batch_failures']:.0f}, "
            f"/readyz after: {ready}"
        )
        if r.errors:
            print(f"  errors: {r.errors}")
        print(HEADER)
        print(_row("load", r))
        ok = (
            r.status_5xx == 0
            and r.lost == 0
            and r.bad_200 == 0
            and r.sent == n
            and stats["server_5xx"] == 0
            and ready == 200
        )
        print(f"  load verdict: {'PASS' if ok else 'FAIL'} (needs zero 5xx, zero lost, every request sent and scored)")
        report["d"] = {**r.summary(), "server": stats, "readyz_after": ready, "pass": ok}
        failed |= not ok

    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; {'FAILED' if failed else 'all checks passed'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
