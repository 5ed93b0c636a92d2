"""Fuzz ``POST /mrc`` with a deterministic corpus of malformed requests (built in ``tests/fuzz/``).

One server for the module (uvicorn in a thread, the small fast metric). The
corpus (> 850 requests, seeded) covers broken images (truncated, bit-flipped,
decompression bombs, odd sizes), every pixel mode of the accepted formats,
refused formats and format/content-type mismatches, animations, broken msgpack
/ JSON / multipart, wrong envelopes and wrong grid entries (every type of every
field), request-pixel budgets, content types, oversized bodies, request ids,
query flags and raw HTTP framing; it is sent by 8 threads at once. Every answer
must be a 4xx with a JSON ``{error, detail, request_id}`` body naming no
internal exception class, except where the case says otherwise: a single image
in an accepted mode is scored, and a multi-grid request with a valid envelope
is a 200 in which each bad grid alone is ``status: "invalid"``. Afterwards the
server must still score a good grid and be ready.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import resource
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from carve3d_reward.model import MRCModel
from carve3d_reward.service.app import create_app
from carve3d_reward.service.settings import ServiceSettings
from carve3d_reward.settings import MetricSettings
from carve3d_reward.tools.synthetic import make_grids

from .fuzz.corpus import build_corpus
from .fuzz.encoders import ERROR, MAX_BODY, MAX_PIXELS, MAX_REQUEST_PIXELS, VIEW_SIZE, Case, encode, locally_invalid
from .fuzz.http import FRAMING
from .fuzz.images import SCORED
from .serving import serve_app

pytestmark = pytest.mark.timeout(300)

SEED = 20240611
WORKERS = 8
#: An internal exception class named in a message meant for the client (e.g. "ValueError", "MultiPartException").
INTERNAL_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception|Warning)\b")


# -- sending and checking --------------------------------------------------------------------------
def _chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def send(client: httpx.Client, base: str, case: Case) -> httpx.Response:
    headers: dict[str, str | bytes] = {}
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    if case.accept is not None:
        headers["accept"] = case.accept
    headers.update(case.headers)
    content: bytes | Iterator[bytes] = _chunks(case.body) if case.chunked else case.body
    return client.request(case.method, base + case.path, content=content, headers=headers)


def check_error(status: int, headers: Any, content: bytes, want: int | None = None) -> str | None:
    """``None`` if this is the API's JSON 4xx (of status ``want`` if given) naming no internal class."""
    if not 400 <= status < 500 or (want is not None and status != want):
        return f"status {status}, expected {want or '4xx'}: {content[:300]!r}"
    if not headers.get("content-type", "").startswith("application/json"):
        return f"status {status} with content-type {headers.get('content-type')!r}"
    try:
        body = json.loads(content)
    except ValueError:
        return f"status {status} with a non-JSON body {content[:200]!r}"
    for key in ("error", "detail", "request_id"):
        if not (isinstance(body, dict) and isinstance(body.get(key), str) and body[key]):
            return f"status {status}: {key!r} missing or empty in {body!r}"
    if INTERNAL_NAME.search(body["detail"]):
        return f"the detail names an internal class: {body['detail']!r}"
    if headers.get("x-request-id") != body["request_id"]:
        return f"X-Request-Id {headers.get('x-request-id')!r} != body request_id {body['request_id']!r}"
    return None


def check_grid(i: int, want: str, res: dict[str, Any]) -> str | None:
    if want == "invalid":
        if res.get("status") != "invalid" or not (isinstance(res.get("error"), str) and res["error"]):
            return f"grid {i}: expected status 'invalid' with an error, got {res!r:.300}"
        if res.get("mrc") is not None:
            return f"grid {i}: an invalid grid has mrc {res['mrc']!r}"
        if INTERNAL_NAME.search(res["error"]):
            return f"grid {i}: the error names an internal class: {res['error']!r}"
    elif res.get("status") not in ("ok", "empty_view") or not isinstance(res.get("mrc"), float):
        return f"grid {i}: expected a score, got {res!r:.300}"
    return None


def check(case: Case, response: httpx.Response) -> str | None:
    """``None`` if the answer is right for the case, else what is wrong."""
    status = response.status_code
    if case.expect == ERROR:
        return check_error(status, response.headers, response.content, case.status)
    if status != 200:
        return f"status {status}, expected 200: {response.content[:300]!r}"
    ctype = response.headers.get("content-type", "")
    try:
        payload = msgpack.unpackb(response.content, raw=False) if "msgpack" in ctype else response.json()
    except ValueError as exc:
        return f"undecodable 200 body ({ctype}): {exc}"
    if case.expect == SCORED:
        return check_grid(0, "scored", payload)
    if case.accept == "application/json" and "json" not in ctype:
        return f"asked for JSON, got {ctype!r}"
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list) or len(results) != len(case.statuses):
        return f"expected {len(case.statuses)} results, got {payload!r:.300}"
    if not payload.get("request_id"):
        return "no request_id in the 200 body"
    for i, (want, res) in enumerate(zip(case.statuses, results, strict=True)):
        if (problem := check_grid(i, want, res)) is not None:
            return problem
    return None


def run_case(client: httpx.Client, base: str, case: Case) -> tuple[Case, str | None, float]:
    start = time.perf_counter()
    try:
        response = send(client, base, case)
    except httpx.HTTPError as exc:
        return case, f"no answer: {type(exc).__name__}: {exc}", time.perf_counter() - start
    return case, check(case, response), time.perf_counter() - start


def raw_exchange(base: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection; the status, headers and body of the first answer."""
    host, port = base.removeprefix("http://").split(":")
    reply = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)  # the write side stays open: a half-closed connection reads as a client gone
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"no HTTP answer: {reply[:200]!r}"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body[: int(headers.get("content-length", len(body)))]


def _length(reply: bytes) -> int:
    match = re.search(rb"(?im)^content-length:\s*(\d+)", reply.partition(b"\r\n\r\n")[0])
    return int(match.group(1)) if match else 1 << 30


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_grids() -> np.ndarray:
    grids = make_grids(6, seed=11, view_size=64)  # [6, 3, 128, 128] float
    return np.clip(np.rint(grids.permute(0, 2, 3, 1).numpy() * 255.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus(good_grids) -> list[Case]:
    return build_corpus(good_grids, SEED)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    metric = MetricSettings(view_size=VIEW_SIZE, carve_resolution=32, carve_samples=64)
    settings = ServiceSettings(
        max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, max_request_pixels=MAX_REQUEST_PIXELS, metric=metric
    )
    with serve_app(create_app(settings, model=MRCModel(metric))) as base:
        yield base


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS * 2)
    with httpx.Client(timeout=httpx.Timeout(60.0), limits=limits) as c:
        yield c


def _score_good(client: httpx.Client, base: str, grid: np.ndarray) -> dict[str, Any]:
    r = client.post(base + "/mrc", content=encode(grid, "PNG"), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()


# -- tests -----------------------------------------------------------------------------------------
CATEGORIES = (
    "png_truncated",
    "png_bitflip",
    "jpeg_truncated",
    "jpeg_bitflip",
    "other_format_mutant",
    "bomb",
    "odd_size",
    "odd_mode_size",
    "mode",
    "refused_format",
    "format_mismatch",
    "animated",
    "random_bytes",
    "empty_body",
    "msgpack_undecodable",
    "msgpack_envelope",
    "msgpack_entry",
    "json_envelope",
    "json_entry",
    "json_invalid",
    "json_bad_base64",
    "content_type",
    "oversized",
    "multipart_malformed",
    "route",
    "request_id_header",
    "query",
    "grids_invalid",
    "request_pixels",
)


def test_corpus_is_large_deterministic_and_covers_every_category(good_grids, corpus):
    again = build_corpus(good_grids, SEED)
    digest = [hashlib.sha256(c.body).hexdigest() + c.name for c in corpus]
    assert digest == [hashlib.sha256(c.body).hexdigest() + c.name for c in again]
    assert len(corpus) >= 850
    assert len({c.name for c in corpus}) == len(corpus)
    counts = collections.Counter(c.category for c in corpus)
    assert set(counts) == set(CATEGORIES), set(counts) ^ set(CATEGORIES)
    for case in corpus:  # the premises: odd sizes really do not split, the modes really decode
        if case.category in ("odd_size", "odd_mode_size", "refused_format", "animated"):
            assert locally_invalid(case.body), case.name
        if case.category == "mode":
            assert not locally_invalid(case.body), case.name
    print("\nfuzz corpus:", dict(sorted(counts.items())), "total", len(corpus))


@pytest.mark.slow
def test_malformed_requests_get_json_4xx_never_5xx(server, client, corpus, good_grids):
    failures: list[str] = []
    slowest: list[tuple[float, str]] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        for case, problem, elapsed in pool.map(lambda c: run_case(client, server, c), corpus):
            slowest.append((elapsed, case.name))
            if problem is not None:
                failures.append(f"[{case.category}] {case.name}: {problem}")
    total = time.perf_counter() - start
    slowest.sort(reverse=True)
    print(f"\n{len(corpus)} requests in {total:.1f} s; slowest: {slowest[:3]}")
    assert not failures, f"{len(failures)} wrong answers:\n" + "\n".join(failures[:40])
    # the server survived: it still scores a good grid and is ready
    assert _score_good(client, server, good_grids[4])["status"] in ("ok", "empty_view")
    assert client.get(server + "/readyz").status_code == 200
    assert client.get(server + "/healthz").status_code == 200
    # and its own counters agree: no 5xx, no batch that raised
    text = client.get(server + "/metrics").text
    five_xx = [line for line in text.splitlines() if re.match(r'mrc_requests_total\{.*code="5\d\d"', line)]
    assert not five_xx, five_xx
    assert re.search(r"^mrc_batch_failures_total 0\.0$", text, re.M), "a batch raised while scoring"


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_malformed_http_framing_gets_the_json_error(server, name):
    status, headers, body = raw_exchange(server, FRAMING[name])
    assert check_error(status, headers, body) is None, (status, headers, body[:300])


def test_decompression_bombs_are_rejected_fast_without_memory_growth(server, client, corpus):
    bombs = [c for c in corpus if c.category == "bomb"]
    assert len(bombs) >= 10
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    for case in bombs:
        start = time.perf_counter()
        response = send(client, server, case)
        elapsed = time.perf_counter() - start
        assert check(case, response) is None, case.name
        assert elapsed < 5.0, f"{case.name} took {elapsed:.1f} s"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 400, f"peak memory grew by {grown_mib:.0f} MiB while rejecting bombs"


def test_retries_are_answered_for_what_they_ask(server, client, good_grids):
    """The idempotency key covers the renders flag and the reply format, not only the id and the body."""
    body = msgpack.packb({"grids": [{"data": good_grids[1].tobytes(), "shape": [128, 128, 3]}]}, use_bin_type=True)
    base = {"content-type": "application/msgpack", "x-request-id": "fuzz-retry-variants"}

    def post(path: str = "/mrc", **extra: str) -> httpx.Response:
        r = client.post(server + path, content=body, headers={**base, **extra})
        assert r.status_code == 200, r.text
        return r

    first = msgpack.unpackb(post().content, raw=False)
    assert "renders" not in first["results"][0]
    with_renders = msgpack.unpackb(post("/mrc?return_renders=true").content, raw=False)
    assert len(with_renders["results"][0]["renders"]) == 4
    as_json = post(accept="application/json")
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["results"][0]["mrc"] == first["results"][0]["mrc"]
    again = post()  # the first variant again: the same answer
    assert msgpack.unpackb(again.content, raw=False) == first
    # two different long ids that share a prefix are two requests, never one truncated key
    for rid in ("p" * 128, "p" * 127 + "q"):
        r = client.post(server + "/mrc", content=body, headers={**base, "x-request-id": rid})
        assert r.status_code == 200 and r.headers["x-request-id"] == rid
    r = client.post(server + "/mrc", content=body, headers={**base, "x-request-id": "p" * 129})
    assert r.status_code == 400 and r.json()["error"] == "bad_request_id"


def test_server_still_healthy(server, client, good_grids):
    assert client.get(server + "/readyz").status_code == 200
    assert _score_good(client, server, good_grids[0])["status"] in ("ok", "empty_view")
