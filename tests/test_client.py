"""The MRC service client against a fake service on loopback: encoding, splitting, retries, errors.

The fake service (a Starlette app served by uvicorn in a background thread) decodes the msgpack
request like the real one and scores each grid as its mean pixel value / 255, so the tests check
that pixels arrive losslessly and in order. It follows a per-test plan of answers (errors,
delays) and records every attempt it sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carve3d_reward.client import (
    AsyncMRCClient,
    GridScore,
    MRCClient,
    MRCRequestError,
    MRCUnavailableError,
    ScoreResult,
    backoff_delay,
    decode_png,
    encode_grids,
    is_retryable_exception,
    is_retryable_status,
    parse_retry_after,
    rewards,
)
from carve3d_reward.errors import ConfigError, InvalidInputError, MRCError

from .serving import free_port, serve_app

FAST = {"backoff": 0.01, "max_backoff": 0.02}  # quick retries for tests


# -- serving an ASGI app on loopback ----------------------------------------------------------------------
@contextlib.contextmanager
def serve(app: Any, *, port: int = 0) -> Iterator[str]:
    """The fake service on loopback; handlers still sleeping after a client timeout are not waited for."""
    with serve_app(app, port=port, force_exit=True) as url:
        yield url


# -- the fake MRC service ------------------------------------------------------------------------------
@dataclass
class Attempt:
    header_id: str
    body_id: str
    n_grids: int
    authorization: str
    content_type: str


def error_response(status: int, error: str, detail: str, retry_after: str | None = None) -> Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return JSONResponse({"error": error, "detail": detail, "request_id": ""}, status_code=status, headers=headers)


def decode_grid(grid: dict[str, Any]) -> np.ndarray:
    if grid.get("image"):
        with Image.open(io.BytesIO(grid["image"])) as img:
            return np.asarray(img.convert("RGB"))
    assert grid["dtype"] == "uint8"
    return np.frombuffer(grid["data"], dtype=np.uint8).reshape(grid["shape"])


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class FakeMRC:
    """Scores each grid as mean pixel / 255, answering attempt ``i`` as ``plan[i]`` says.

    An answer is None (score it), a Response (send it as it is) or a number (sleep that many
    seconds, then score); ``default`` is the answer once the plan is used up. A request id seen
    before is answered from its first computation, as the real service does.
    """

    def __init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/mrc", self.mrc, methods=["POST"]),
                Route("/readyz", self.readyz),
                Route("/v1/info", self.info),
            ]
        )
        self.reset()

    def reset(self, *plan: Any, default: Any = None, token: str | None = None) -> None:
        self.plan = list(plan)
        self.default = default
        self.token = token
        self.attempts: list[Attempt] = []
        self.seen: list[np.ndarray] = []  # decoded grids of every scored request, in arrival order
        self.answers: dict[str, dict[str, Any]] = {}  # request id -> first answer (idempotency)

    async def mrc(self, request: Request) -> Response:
        # bind this test's records now: a handler still sleeping when its test ends must not write to the next's
        seen, answers = self.seen, self.answers
        req = msgpack.unpackb(await request.body(), raw=False)
        self.attempts.append(
            Attempt(
                header_id=request.headers.get("x-request-id", ""),
                body_id=req["request_id"],
                n_grids=len(req["grids"]),
                authorization=request.headers.get("authorization", ""),
                content_type=request.headers.get("content-type", ""),
            )
        )
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            return error_response(401, "unauthorized", "missing or wrong bearer token")
        action = self.plan.pop(0) if self.plan else self.default
        if isinstance(action, Response):
            return action
        if isinstance(action, float | int):
            await asyncio.sleep(action)
        rid = req["request_id"]
        if rid not in answers:
            answers[rid] = self.score(req, seen)
        return Response(msgpack.packb(answers[rid], use_bin_type=True), media_type="application/msgpack")

    def score(self, req: dict[str, Any], seen: list[np.ndarray] | None = None) -> dict[str, Any]:
        results = []
        for grid in req["grids"]:
            arr = decode_grid(grid)
            if seen is not None:
                seen.append(arr)
            mrc = float(arr.mean()) / 255.0
            h, w = arr.shape[0] // 2, arr.shape[1] // 2
            tiles = [arr[:h, :w], arr[:h, w:], arr[h:, :w], arr[h:, w:]]
            results.append(
                {
                    "mrc": mrc,
                    "reward": -mrc,
                    "status": "ok" if arr.any() else "empty_view",
                    "views": [{"distance": mrc, "bbox": [0, 0, w - 1, h - 1], "empty": False} for _ in tiles],
                    "metric": "fake-mean",
                    "version": "0.0.0",
                    "error": "",
                    "renders": [png(t) for t in tiles] if req.get("return_renders") else [],
                }
            )
        return {"results": results, "request_id": req["request_id"], "metric": "fake-mean"}

    async def readyz(self, request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def info(self, request: Request) -> Response:
        return JSONResponse({"metric": "fake-mean", "version": "0.0.0", "limits": {"max_grids": 256}})


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeMRC, str]]:
    fake = FakeMRC()
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def fake(fake_server) -> FakeMRC:
    fake_server[0].reset()
    return fake_server[0]


@pytest.fixture
def url(fake_server) -> str:
    return fake_server[1]


def grids_batch(b: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(b, size, size, 3), dtype=np.uint8)


# -- encoding -----------------------------------------------------------------------------------------
def test_encode_raw_and_png_are_lossless():
    batch = grids_batch(2)
    raw = encode_grids(batch)
    assert [g["shape"] for g in raw] == [[32, 32, 3]] * 2 and all(g["dtype"] == "uint8" for g in raw)
    assert raw[1]["data"] == batch[1].tobytes()
    pngs = encode_grids(batch, "png")
    assert all(set(g) == {"image"} and g["image"].startswith(b"\x89PNG") for g in pngs)
    np.testing.assert_array_equal(decode_png(pngs[1]["image"]), batch[1])


def test_encode_accepts_single_grids_lists_bytes_paths_and_channels_first(tmp_path):
    batch = grids_batch(3)
    path = tmp_path / "g.png"
    path.write_bytes(png(batch[0]))
    items = encode_grids([batch[0], batch[1:], png(batch[2]), path, torch.from_numpy(batch[:1])])
    assert len(items) == 6
    assert items[0]["data"] == batch[0].tobytes() and items[2]["data"] == batch[2].tobytes()
    assert items[3]["image"] == png(batch[2]) and items[4]["image"] == path.read_bytes()
    chw = encode_grids(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))  # uint8 [B, 3, H, W]
    assert [g["data"] for g in chw] == [g.tobytes() for g in batch]


def test_encode_float_tensor_rounds_and_clips():
    values = torch.tensor([0.0, 1.0, 0.5, 1 / 255, 254.4 / 255, 254.6 / 255, -0.1, 1.3])
    x = values.repeat(3 * 32 * 32 // 8).reshape(1, 3, 32, 32)  # channels-first, as the metric takes it
    (grid,) = encode_grids(x)
    got = np.frombuffer(grid["data"], np.uint8).reshape(32, 32, 3)
    np.testing.assert_array_equal(got, x[0].permute(1, 2, 0).mul(255).clamp(0, 255).round().to(torch.uint8).numpy())
    flat = np.frombuffer(grid["data"], np.uint8).reshape(32 * 32, 3).T.reshape(-1)  # back to [3, H, W] order
    assert flat[:8].tolist() == [0, 255, 128, 1, 254, 255, 0, 255]
    (half,) = encode_grids(x.to(torch.bfloat16))  # bfloat16/float16 go through float32
    assert len(half["data"]) == 32 * 32 * 3


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((2, 32, 32, 4), np.uint8), "3 colour channels"),
        (np.zeros((32, 32), np.uint8), "shape"),
        (np.zeros((1, 32, 32, 3), np.int64), "dtype"),
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        (torch.full((1, 3, 32, 32), float("inf")), "NaN or infinite"),
        (b"", "empty"),
        ([[1, 2, 3]], "nested"),
        ({"a": 1}, "unsupported"),
    ],
)
def test_encode_rejects_bad_input(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        encode_grids(bad)


def test_bad_configuration_is_a_config_error():
    with pytest.raises(ConfigError, match="wire"):
        encode_grids(grids_batch(1), "jpeg")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="http"):
        MRCClient("127.0.0.1:8080")
    with pytest.raises(ConfigError, match="retries"):
        MRCClient("http://127.0.0.1:1", retries=-1)
    with pytest.raises(InvalidInputError, match="request_id"):
        MRCClient("http://127.0.0.1:1").score(grids_batch(1), request_id="has space")
    with pytest.raises(InvalidInputError, match="1 to 128"):  # the service refuses longer ids: never send one
        MRCClient("http://127.0.0.1:1").score(grids_batch(1), request_id="r" * 129)
    with pytest.raises(InvalidInputError, match="too long for a batch sent as 2 requests"):
        MRCClient("http://127.0.0.1:1", max_grids_per_request=1).score(grids_batch(2), request_id="r" * 127)


# -- the retry policy, pure ---------------------------------------------------------------------------
def test_backoff_delay_is_bounded_grows_and_is_jittered():
    caps = [backoff_delay(n, backoff=0.5, max_backoff=8.0, rand=lambda: 1.0) for n in range(1, 10)]
    assert caps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert backoff_delay(3, backoff=0.5, max_backoff=8.0, rand=lambda: 0.0) == 0.0
    assert backoff_delay(10_000, backoff=0.5, max_backoff=8.0, rand=lambda: 1.0) == 8.0  # no overflow
    for n in range(1, 8):
        cap = min(8.0, 0.5 * 2 ** (n - 1))
        samples = [backoff_delay(n, backoff=0.5, max_backoff=8.0) for _ in range(200)]
        assert all(0.0 <= s <= cap for s in samples)
        assert len(set(samples)) > 150  # jittered, not a fixed schedule
        assert max(samples) > 0.8 * cap
    # Retry-After wins when longer, never shortens the backoff
    assert backoff_delay(1, backoff=0.5, max_backoff=8.0, retry_after=3.0, rand=lambda: 1.0) == 3.0
    assert backoff_delay(5, backoff=0.5, max_backoff=8.0, retry_after=0.0, rand=lambda: 1.0) == 8.0


def test_retry_classification_and_retry_after_parsing():
    assert [s for s in (400, 401, 404, 413, 415, 422, 429, 500, 502, 503, 504) if is_retryable_status(s)] == [
        502,
        503,
        504,
    ]
    assert is_retryable_exception(httpx.ConnectError("refused"))
    assert is_retryable_exception(httpx.ReadTimeout("slow"))
    assert is_retryable_exception(httpx.RemoteProtocolError("hung up"))
    assert not is_retryable_exception(httpx.UnsupportedProtocol("ftp"))
    assert not is_retryable_exception(httpx.HTTPStatusError("500", request=None, response=None))  # type: ignore[arg-type]
    assert not is_retryable_exception(ValueError("x"))
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("nan") is None
    assert parse_retry_after("-3") == 0.0 and parse_retry_after("99999") == 60.0
    assert parse_retry_after("Thu, 01 Jan 2099 00:00:10 GMT", now=4070908800.0) == pytest.approx(10.0)


# -- scoring against the fake service -------------------------------------------------------------------
@pytest.mark.parametrize("wire", ["raw", "png"])
def test_score_sends_pixels_losslessly_in_order(fake, url, wire):
    batch = grids_batch(4)
    with MRCClient(url, wire=wire) as client:
        results = client.score(batch, request_id="req-1")
    assert len(fake.seen) == 4
    for arr, sent in zip(fake.seen, batch, strict=True):
        np.testing.assert_array_equal(arr, sent)
    assert [r.mrc for r in results] == pytest.approx([g.mean() / 255 for g in batch])
    assert ScoreResult is GridScore  # the client's name for the one score type
    assert all(isinstance(r, GridScore) and r.ok and r.valid and r.reward == -r.mrc for r in results)
    assert results[0].metric == "fake-mean" and len(results[0].views) == 4 and results[0].request_id == "req-1"
    (attempt,) = fake.attempts
    assert attempt.header_id == attempt.body_id == "req-1" and attempt.content_type == "application/msgpack"


def test_torch_float_channels_first_input(fake, url):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with MRCClient(url) as client:
        results = client.score(x)
    expected = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for arr, exp in zip(fake.seen, expected, strict=True):
        np.testing.assert_array_equal(arr, exp)
    assert np.abs(np.stack(fake.seen) / 255.0 - x.permute(0, 2, 3, 1).numpy()).max() <= 0.5 / 255 + 1e-6
    assert [r.mrc for r in results] == pytest.approx([e.mean() / 255 for e in expected])


def test_large_batch_is_split_in_order(fake, url):
    batch = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(7)])
    with MRCClient(url, max_grids_per_request=3) as client:
        results = client.score(list(batch), request_id="big")
    assert [a.n_grids for a in fake.attempts] == [3, 3, 1]
    assert [a.body_id for a in fake.attempts] == ["big-0", "big-1", "big-2"]
    assert [a.header_id for a in fake.attempts] == ["big-0", "big-1", "big-2"]
    assert [r.mrc for r in results] == pytest.approx([10 * i / 255 for i in range(7)])
    assert [r.request_id for r in results] == ["big-0"] * 3 + ["big-1"] * 3 + ["big-2"]
    # the byte limit splits too (each raw grid is 3072 bytes)
    fake.reset()
    with MRCClient(url, max_request_bytes=2 * 3072) as client:
        results = client.score(batch)
    assert [a.n_grids for a in fake.attempts] == [2, 2, 2, 1]
    assert [r.mrc for r in results] == pytest.approx([10 * i / 255 for i in range(7)])


def test_empty_input_sends_nothing(fake, url):
    with MRCClient(url) as client:
        assert client.score([]) == []
        assert client.score(np.zeros((0, 32, 32, 3), np.uint8)) == []
    assert fake.attempts == []


def test_renders_are_returned_and_decoded(fake, url):
    batch = grids_batch(2)
    with MRCClient(url) as client:
        plain = client.score(batch)
        with_renders = client.score(batch, return_renders=True)
    assert plain[0].renders == []
    tiles = with_renders[1].render_arrays()
    assert len(tiles) == 4 and tiles[0].dtype == np.uint8
    np.testing.assert_array_equal(tiles[3], batch[1][16:, 16:])
    out = rewards([*with_renders, GridScore(mrc=None, reward=None, status="invalid", error="bad")])
    assert np.isnan(out[2]) and out[:2] == pytest.approx([-r.mrc for r in with_renders])


def test_ready_and_info(url):
    with MRCClient(url) as client:
        assert client.ready() is True
        assert client.info()["metric"] == "fake-mean"
    with MRCClient(f"http://127.0.0.1:{free_port()}", timeout=1.0) as client:
        assert client.ready() is False


def test_bearer_token_is_sent(fake, url):
    fake.reset(token="s3cret")
    with MRCClient(url, token="s3cret") as client:
        assert client.score(grids_batch(1))[0].ok
    assert fake.attempts[0].authorization == "Bearer s3cret"
    fake.reset(token="s3cret")
    with MRCClient(url, token="wrong") as client, pytest.raises(MRCRequestError, match="401") as err:
        client.score(grids_batch(1))
    assert err.value.status == 401 and len(fake.attempts) == 1


# -- retries ------------------------------------------------------------------------------------------
def test_retry_on_503_honours_retry_after_and_keeps_the_request_id(fake, url, caplog):
    fake.reset(error_response(503, "queue_full", "the queue is full", retry_after="1"))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="carve3d_reward.client"), MRCClient(url, **FAST) as client:
        results = client.score(grids_batch(2))
    assert time.monotonic() - t0 >= 0.95  # waited Retry-After, not the 10 ms backoff
    assert len(fake.attempts) == 2 and results[0].ok
    ids = {a.header_id for a in fake.attempts} | {a.body_id for a in fake.attempts}
    assert len(ids) == 1  # the same id, header and body, on every attempt
    (record,) = [r for r in caplog.records if r.name == "carve3d_reward.client"]
    assert record.levelno == logging.WARNING and "503" in record.getMessage() and "queue_full" in record.getMessage()


@pytest.mark.parametrize("status", [502, 504])
def test_retry_on_502_and_504(fake, url, status):
    fake.reset(error_response(status, "timeout", "took too long"))
    with MRCClient(url, **FAST) as client:
        assert client.score(grids_batch(1))[0].ok
    assert len(fake.attempts) == 2


def test_retry_on_connection_refused_until_the_server_is_up(caplog):
    port = free_port()
    fake = FakeMRC()
    stack = contextlib.ExitStack()
    starter = threading.Timer(0.3, lambda: stack.enter_context(serve(fake.app, port=port)))
    starter.start()
    try:
        with MRCClient(f"http://127.0.0.1:{port}", retries=100, backoff=0.02, max_backoff=0.05) as client:
            results = client.score(grids_batch(1), request_id="wait-for-me")
    finally:
        starter.join()
        stack.close()
    assert results[0].ok
    assert [a.body_id for a in fake.attempts] == ["wait-for-me"]  # the failed attempts never reached it
    assert any("ConnectError" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def disconnecting_server(drops: int) -> Iterator[tuple[str, list[str]]]:
    """A raw HTTP server: reads each request, hangs up without answering ``drops`` times, then scores."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(10)
    seen_ids: list[str] = []
    fake = FakeMRC()

    def read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        while len(body) < length:
            body += conn.recv(65536)
        return body

    def run() -> None:
        for i in range(drops + 1):
            conn, _ = listener.accept()
            with conn:
                req = msgpack.unpackb(read_request(conn), raw=False)
                seen_ids.append(req["request_id"])
                if i < drops:
                    continue  # close without a response
                body = msgpack.packb(fake.score(req), use_bin_type=True)
                head = (
                    "HTTP/1.1 200 OK\r\nContent-Type: application/msgpack\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                conn.sendall(head.encode() + body)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", seen_ids
    finally:
        thread.join(timeout=5)
        listener.close()


def test_retry_when_the_server_closes_the_connection(caplog):
    with disconnecting_server(drops=2) as (url, seen_ids), MRCClient(url, **FAST) as client:
        results = client.score(grids_batch(2))
    assert [r.ok for r in results] == [True, True]
    assert len(seen_ids) == 3 and len(set(seen_ids)) == 1
    assert sum("RemoteProtocolError" in r.getMessage() for r in caplog.records) == 2


def test_no_retry_on_400(fake, url):
    fake.reset(error_response(400, "invalid_request", "grids[0]: shape must be [H, W, 3]"))
    with MRCClient(url, **FAST) as client, pytest.raises(MRCRequestError) as err:
        client.score(grids_batch(1), request_id="bad-1")
    assert len(fake.attempts) == 1
    e = err.value
    assert (e.status, e.error, e.detail, e.request_id) == (
        400,
        "invalid_request",
        "grids[0]: shape must be [H, W, 3]",
        "bad-1",
    )
    assert "grids[0]: shape must be" in str(e) and isinstance(e, MRCError)


@pytest.mark.parametrize("status", [500, 413, 415])
def test_no_retry_on_500_and_other_errors(fake, url, status):
    fake.reset(error_response(status, "boom", "something broke"))
    with MRCClient(url, **FAST) as client, pytest.raises(MRCRequestError, match="something broke") as err:
        client.score(grids_batch(1))
    assert len(fake.attempts) == 1 and err.value.status == status


def test_non_json_error_body(fake, url):
    fake.reset(Response("<html>Bad Gateway</html>", status_code=400, media_type="text/html"))
    with MRCClient(url) as client, pytest.raises(MRCRequestError, match="Bad Gateway") as err:
        client.score(grids_batch(1))
    assert err.value.error == "http_400"


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (Response(b"hello, not msgpack", media_type="text/plain"), "not a msgpack ScoreResponse"),
        (Response(msgpack.packb([1, 2]), media_type="application/msgpack"), "'results' list"),
        (Response(msgpack.packb({"results": []}), media_type="application/msgpack"), "0 results for 2 grids"),
        (Response(msgpack.packb({"results": [{}, {}]}), media_type="application/msgpack"), "bad GridScore"),
    ],
)
def test_malformed_responses(fake, url, answer, match):
    fake.reset(answer)
    with MRCClient(url) as client, pytest.raises(MRCRequestError, match=match) as err:
        client.score(grids_batch(2))
    assert err.value.error == "malformed_response" and len(fake.attempts) == 1


def test_exhausted_retries_raise_unavailable(fake, url):
    fake.reset(default=error_response(503, "engine_down", "the engine is restarting", retry_after="0"))
    with MRCClient(url, retries=2, **FAST) as client, pytest.raises(MRCUnavailableError) as err:
        client.score(grids_batch(1), request_id="gone")
    assert len(fake.attempts) == 3
    msg = str(err.value)
    assert "3 attempts" in msg and "retries exhausted" in msg and "engine_down" in msg and "gone" in msg
    assert err.value.attempts == 3 and "the engine is restarting" in err.value.last_error


def test_deadline_is_honoured(fake, url):
    fake.reset(default=error_response(503, "queue_full", "busy", retry_after="0"))
    t0 = time.monotonic()
    client = MRCClient(url, retries=1000, deadline=1.0, backoff=0.05, max_backoff=0.2)
    with client, pytest.raises(MRCUnavailableError, match="deadline of 1 s") as err:
        client.score(grids_batch(1))
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5 and err.value.elapsed <= 1.05
    assert 3 <= len(fake.attempts) == err.value.attempts < 1000


def test_retry_after_beyond_the_deadline_gives_up_at_once(fake, url):
    fake.reset(default=error_response(503, "queue_full", "busy", retry_after="30"))
    t0 = time.monotonic()
    with MRCClient(url, deadline=5.0) as client, pytest.raises(MRCUnavailableError, match="1 attempt over"):
        client.score(grids_batch(1))
    assert time.monotonic() - t0 < 1.0 and len(fake.attempts) == 1


def test_timeout_is_retried_then_gives_up(fake, url):
    fake.reset(default=0.6)  # every answer comes after 0.6 s
    t0 = time.monotonic()
    client = MRCClient(url, timeout=0.15, retries=2, **FAST)
    with client, pytest.raises(MRCUnavailableError, match="3 attempts") as err:
        client.score(grids_batch(1), request_id="slow")
    assert time.monotonic() - t0 < 1.2
    assert "ReadTimeout" in err.value.last_error
    assert [a.body_id for a in fake.attempts] == ["slow"] * 3


def test_timeout_then_success_reuses_the_id(fake, url):
    fake.reset(0.6)  # only the first answer is slow
    with MRCClient(url, timeout=0.15, **FAST) as client:
        results = client.score(grids_batch(2), request_id="slow-then-fast")
    assert [r.ok for r in results] == [True, True]
    assert [a.header_id for a in fake.attempts] == ["slow-then-fast"] * 2


def test_deadline_shortens_the_attempt_timeout(fake, url):
    fake.reset(default=2.0)
    t0 = time.monotonic()
    with MRCClient(url, timeout=30.0, deadline=0.4, **FAST) as client, pytest.raises(MRCUnavailableError):
        client.score(grids_batch(1))
    assert time.monotonic() - t0 < 1.0


# -- the async client -----------------------------------------------------------------------------------
def test_async_success_retry_and_errors(fake, url, caplog):
    batch = grids_batch(5)

    async def main() -> None:
        async with AsyncMRCClient(url, wire="png", max_grids_per_request=2, **FAST) as client:
            assert await client.ready() is True
            assert (await client.info())["version"] == "0.0.0"
            results = await client.score(batch, request_id="a")
            assert [r.mrc for r in results] == pytest.approx([g.mean() / 255 for g in batch])
            assert [a.body_id for a in fake.attempts] == ["a-0", "a-1", "a-2"]
            for arr, sent in zip(fake.seen, batch, strict=True):
                np.testing.assert_array_equal(arr, sent)

        # a 503, then a timeout, then success: the same id every time
        fake.reset(error_response(503, "queue_full", "busy", retry_after="0"), 0.5)
        async with AsyncMRCClient(url, timeout=0.2, **FAST) as client:
            results = await client.score(batch[:1], request_id="b")
            assert results[0].ok and [a.header_id for a in fake.attempts] == ["b"] * 3

            fake.reset(error_response(400, "invalid_request", "no grids"))
            with pytest.raises(MRCRequestError, match="no grids"):
                await client.score(batch[:1])
            assert len(fake.attempts) == 1

        fake.reset(default=error_response(503, "queue_full", "busy", retry_after="0"))
        async with AsyncMRCClient(url, retries=3, **FAST) as client:
            with pytest.raises(MRCUnavailableError, match="4 attempts"):
                await client.score(batch[:1])

    asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "carve3d_reward.client"]
    assert any("ReadTimeout" in m for m in messages) and any("503" in m for m in messages)


def test_async_connection_refused_is_unavailable():
    async def main() -> None:
        async with AsyncMRCClient(f"http://127.0.0.1:{free_port()}", retries=2, **FAST) as client:
            assert await client.ready() is False
            with pytest.raises(MRCUnavailableError, match=r"3 attempts.*ConnectError"):
                await client.score(grids_batch(1))

    asyncio.run(main())
