"""A client of the MRC reward service (``POST /mrc``), sync and async, with safe retries.

>>> with MRCClient("http://127.0.0.1:8080", token="...") as client:
...     results = client.score(grids)  # uint8 [B, H, W, 3], float [B, 3, H, W] in [0, 1], PNG bytes...
...     rewards = [r.reward if r.ok else None for r in results]

The wire schema is ``proto/mrc.proto``: a msgpack ``ScoreRequest`` goes up, a msgpack
``ScoreResponse`` comes back, one ``GridScore`` per grid in request order. No pickle anywhere.

**Pixels travel losslessly.** ``wire="raw"`` (the default) sends the raw ``uint8`` pixels;
``wire="png"`` sends a lossless PNG (smaller on the wire, a little CPU to encode). Arrays are
never sent as JPEG: JPEG artefacts shift the LPIPS distances, so a JPEG-encoded grid gets a
different score than its pixels. Bytes you pass yourself (PNG or JPEG files) go as they are.

**Retries never double-score.** Every request carries an id (``X-Request-Id`` and the body's
``request_id``, a uuid4 unless given); every retry reuses it, and the service answers a repeated
id from its first computation. Retried: connection errors and timeouts (``httpx.TransportError``)
and HTTP 502/503/504, with exponential backoff and full jitter capped at ``max_backoff``, waiting
at least the service's ``Retry-After``; bounded by ``retries`` and by the overall ``deadline``.
Never retried: other 4xx and 500 (:class:`MRCRequestError` at once). When the retries or the
deadline run out: :class:`MRCUnavailableError`, saying how many attempts over how long and the
last error. Retries are logged at WARNING on the ``carve3d_reward.client`` logger.

Large batches are split into requests of at most ``max_grids_per_request`` grids and
``max_request_bytes`` bytes, each with its own id (``<id>-<chunk index>``), sent one after the
other; the results are concatenated in input order.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
import msgpack
import numpy as np

from . import __version__
from .errors import ConfigError, InvalidInputError, MRCError
from .pixels import to_uint8
from .scores import GridScore, Status, decode_png
from .wire import MAX_REQUEST_ID_LENGTH, REQUEST_ID_RULE, is_valid_request_id

__all__ = [
    "DEFAULT_MAX_GRIDS_PER_REQUEST",
    "DEFAULT_MAX_REQUEST_BYTES",
    "RETRYABLE_STATUSES",
    "AsyncMRCClient",
    "GridScore",
    "MRCClient",
    "MRCRequestError",
    "MRCUnavailableError",
    "RetryPolicy",
    "ScoreResult",
    "backoff_delay",
    "decode_png",
    "encode_grids",
    "is_retryable_exception",
    "is_retryable_status",
    "parse_retry_after",
    "rewards",
]

logger = logging.getLogger("carve3d_reward.client")

Wire = Literal["raw", "png"]
WIRES: tuple[str, ...] = ("raw", "png")
MSGPACK = "application/msgpack"
RETRYABLE_STATUSES = frozenset({502, 503, 504})
DEFAULT_MAX_GRIDS_PER_REQUEST = 64
DEFAULT_MAX_REQUEST_BYTES = 48 << 20  # the service's default body limit is 64 MiB
MAX_RETRY_AFTER = 60.0  # a longer Retry-After is honoured only up to this many seconds
PNG_COMPRESS_LEVEL = 3  # zlib level: lossless at any level; 3 is a good size/speed trade-off


# -- errors ---------------------------------------------------------------------------------------------
class MRCRequestError(MRCError):
    """The service refused the request (4xx, 500) or answered something that is not a ScoreResponse.

    Never retried: sending the same request again would fail the same way.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str = "",
        detail: str = "",
        request_id: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.detail = detail
        self.request_id = request_id


class MRCUnavailableError(MRCError):
    """The service could not be reached or stayed busy until the retries or the deadline ran out."""

    def __init__(self, message: str, *, attempts: int, elapsed: float, last_error: str, request_id: str) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error
        self.request_id = request_id


# -- results --------------------------------------------------------------------------------------------
#: The client's name for :class:`~carve3d_reward.scores.GridScore` (the same class: one score type everywhere).
ScoreResult = GridScore


def rewards(results: Sequence[GridScore], *, include_empty: bool = True) -> np.ndarray:
    """``float64 [B]`` rewards, NaN where a grid was not scored (and for empty views if not ``include_empty``)."""
    out = np.full(len(results), np.nan, dtype=np.float64)
    for i, r in enumerate(results):
        if r.reward is not None and (r.ok or (include_empty and r.status is Status.EMPTY_VIEW)):
            out[i] = r.reward
    return out


def _read_score(obj: Any, request_id: str) -> GridScore:
    try:
        return GridScore.from_wire(obj, request_id=request_id)
    except (TypeError, ValueError) as exc:
        raise _malformed(f"bad GridScore: {exc}", request_id) from None


# -- encoding -------------------------------------------------------------------------------------------
GridsInput = Any  # np.ndarray | torch.Tensor | bytes | os.PathLike | Sequence of those


def encode_grids(grids: GridsInput, wire: Wire = "raw") -> list[dict[str, Any]]:
    """Turn grids into ``Grid`` messages of ``proto/mrc.proto``, in order.

    Accepted, one grid or a batch:

    * ``uint8`` arrays (numpy or torch) ``[H, W, 3]`` / ``[B, H, W, 3]`` (or channels-first
      ``[3, H, W]`` / ``[B, 3, H, W]``), sent as they are;
    * float arrays in ``[0, 1]`` (numpy or torch, e.g. the metric's ``float [B, 3, H, W]``),
      clipped to ``[0, 1]`` and converted with ``round(x * 255)``; NaN or inf is an error;
    * encoded image bytes (PNG, JPEG...) or a path to an image file, sent as they are;
    * a list or tuple of any of the above (batches are flattened in order).

    ``wire="raw"`` sends raw pixels ``{data, shape: [H, W, 3], dtype: "uint8"}``; ``wire="png"``
    sends ``{image: <lossless PNG>}``. Arrays are never JPEG-encoded (JPEG shifts LPIPS).
    """
    wire = _check_wire(wire)
    return [_encode_item(item, wire) for item in _grid_items(grids)]


def _check_wire(wire: str) -> Wire:
    if wire not in WIRES:
        raise ConfigError(f"wire must be one of {', '.join(WIRES)}, got {wire!r}")
    return wire  # type: ignore[return-value]


def _grid_items(grids: GridsInput) -> list[np.ndarray | bytes]:
    """Flatten the input into single grids: ``uint8 [H, W, 3]`` arrays or encoded image bytes."""
    if isinstance(grids, list | tuple):
        items: list[np.ndarray | bytes] = []
        for i, item in enumerate(grids):
            if isinstance(item, list | tuple):
                raise InvalidInputError(f"grids[{i}]: nested lists are not grids; pass arrays, tensors or image bytes")
            items.extend(_grid_items(item))
        return items
    if isinstance(grids, bytes | bytearray | memoryview):
        data = bytes(grids)
        if not data:
            raise InvalidInputError("empty image: 0 bytes")
        return [data]
    if isinstance(grids, str | os.PathLike):
        path = Path(grids)
        try:
            return _grid_items(path.read_bytes())
        except OSError as exc:
            raise InvalidInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    batch = _to_uint8_batch(grids)
    return list(batch)


def _to_uint8_batch(grids: Any) -> np.ndarray:
    """A numpy array or torch tensor -> C-contiguous ``uint8 [B, H, W, 3]``."""
    torch = sys.modules.get("torch")  # never import torch just to check a type
    if torch is not None and isinstance(grids, torch.Tensor):
        t = grids.detach()
        if t.is_floating_point():  # convert where the tensor lives: a quarter of the bytes to copy off a GPU
            t = t.to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise InvalidInputError("grids contain NaN or infinite values")
            t = to_uint8(t)
        arr = t.cpu().numpy()
    elif isinstance(grids, np.ndarray):
        arr = grids
    else:
        raise InvalidInputError(
            f"unsupported grid input {type(grids).__name__}: expected a numpy array, a torch tensor, "
            "image bytes, a path or a list of those"
        )
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise InvalidInputError(f"expected grids [H, W, 3], [B, H, W, 3] or [B, 3, H, W], got shape {list(arr.shape)}")
    if arr.shape[-1] != 3:
        if arr.shape[1] != 3:
            raise InvalidInputError(f"expected 3 colour channels (first or last), got shape {list(arr.shape)}")
        arr = arr.transpose(0, 2, 3, 1)  # channels-first -> channels-last
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidInputError("grids contain NaN or infinite values")
        return np.ascontiguousarray(to_uint8(arr))
    raise InvalidInputError(f"expected uint8 grids or float grids in [0, 1], got dtype {arr.dtype}")


def _encode_item(item: np.ndarray | bytes, wire: Wire) -> dict[str, Any]:
    if isinstance(item, bytes):
        return {"image": item}
    h, w, _ = item.shape
    if wire == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(item, mode="RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return {"image": buf.getvalue()}
    return {"data": item.tobytes(), "shape": [int(h), int(w), 3], "dtype": "uint8"}


def _grid_nbytes(grid: dict[str, Any]) -> int:
    return len(grid.get("image") or grid.get("data") or b"")


def _chunk(grids: list[dict[str, Any]], max_grids: int, max_bytes: int) -> list[list[dict[str, Any]]]:
    """Split in order into chunks of at most ``max_grids`` grids and ``max_bytes`` bytes (one grid at least)."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for grid in grids:
        n = _grid_nbytes(grid)
        if current and (len(current) >= max_grids or size + n > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(grid)
        size += n
    if current:
        chunks.append(current)
    return chunks


# -- retry policy (shared by the sync and async clients) -------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry. ``retries`` counts retries: at most ``retries + 1`` attempts."""

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0
    deadline: float | None = None  # seconds for a whole call, all attempts and waits included
    timeout: float | None = 60.0  # seconds for each network operation of one attempt

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        if not (self.backoff >= 0 and self.max_backoff >= 0):
            raise ConfigError(f"backoff and max_backoff must be >= 0, got {self.backoff}, {self.max_backoff}")
        if self.deadline is not None and not self.deadline > 0:
            raise ConfigError(f"deadline must be > 0 seconds (or None), got {self.deadline}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds (or None), got {self.timeout}")


def backoff_delay(
    attempt: int,
    *,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Full jitter: uniform in ``[0, min(max_backoff, backoff * 2 ** (attempt - 1))]``; a
    ``retry_after`` from the service wins when it is longer.
    """
    cap = min(max_backoff, backoff * 2.0 ** min(max(attempt - 1, 0), 62))
    delay = rand() * cap
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def is_retryable_status(status: int) -> bool:
    """502/503/504 are retried (busy, draining, proxy trouble, server-side timeout); 4xx and 500 never."""
    return status in RETRYABLE_STATUSES


def is_retryable_exception(exc: BaseException) -> bool:
    """Connection errors and timeouts are retried; a bad URL or a request httpx cannot send is not."""
    return isinstance(exc, httpx.TransportError) and not isinstance(
        exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) -> seconds, at most :data:`MAX_RETRY_AFTER`; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_fields(resp: httpx.Response) -> tuple[str, str, str]:
    """``(error, detail, request_id)`` from an ErrorResponse body (JSON, or msgpack), or from the raw text."""
    body: Any = None
    ctype = resp.headers.get("content-type", "")
    try:
        body = msgpack.unpackb(resp.content, raw=False) if "msgpack" in ctype else json.loads(resp.content)
    except (ValueError, TypeError, msgpack.UnpackException):
        body = None
    if isinstance(body, dict) and ("error" in body or "detail" in body):
        detail = body.get("detail", "")
        if not isinstance(detail, str):  # e.g. FastAPI's validation errors
            detail = json.dumps(detail, default=str)
        return str(body.get("error") or f"http_{resp.status_code}"), detail, str(body.get("request_id") or "")
    text = " ".join(resp.text.split())[:300] if resp.content else ""
    return f"http_{resp.status_code}", text or resp.reason_phrase, ""


def _malformed(detail: str, request_id: str, status: int | None = 200) -> MRCRequestError:
    return MRCRequestError(
        f"malformed response from the MRC service: {detail} (request id {request_id})",
        status=status,
        error="malformed_response",
        detail=detail,
        request_id=request_id,
    )


class _Attempts:
    """The retry state of one request: counts attempts, checks the deadline, decides what to do next.

    Pure bookkeeping, no I/O: both clients drive it the same way::

        while True:
            timeout = attempts.begin()              # or MRCUnavailableError: deadline passed
            try: resp = send(timeout)
            except httpx.TransportError as exc:
                delay = attempts.on_exception(exc)  # or raise
            else:
                delay = attempts.on_response(resp)  # None: success; else retry; or raise
                if delay is None: return resp
            sleep(delay)
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        what: str,
        request_id: str,
        started: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.what = what
        self.request_id = request_id
        self.clock = clock
        self.rand = rand
        self.started = clock() if started is None else started
        self.attempts = 0
        self.last_error = ""

    def remaining(self) -> float | None:
        if self.policy.deadline is None:
            return None
        return self.policy.deadline - (self.clock() - self.started)

    def begin(self) -> float | None:
        """Start an attempt; its timeout in seconds (shortened to the time left before the deadline)."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise self._give_up(f"deadline of {self.policy.deadline:g} s reached")
        self.attempts += 1
        timeout = self.policy.timeout
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        return timeout

    def on_exception(self, exc: BaseException) -> float:
        """A transport error: seconds to wait before retrying, or raise."""
        if not is_retryable_exception(exc):
            raise MRCRequestError(
                f"cannot send the request to {self.what}: {_describe_exception(exc)}",
                error=type(exc).__name__,
                detail=str(exc),
                request_id=self.request_id,
            ) from exc
        return self._failed(_describe_exception(exc), None)

    def on_response(self, resp: httpx.Response) -> float | None:
        """None for a 2xx; seconds to wait for 502/503/504; :class:`MRCRequestError` for anything else."""
        status = resp.status_code
        if 200 <= status < 300:
            return None
        error, detail, _ = _error_fields(resp)
        if is_retryable_status(status):
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            return self._failed(f"HTTP {status} {error}: {detail}".rstrip(": "), retry_after)
        hint = ""
        if status == 413:
            hint = " (lower max_grids_per_request / max_request_bytes, or use wire='png')"
        elif status == 401:
            hint = " (check the client's token)"
        raise MRCRequestError(
            f"MRC service rejected the request: HTTP {status} {error}: {detail}{hint} (request id {self.request_id})",
            status=status,
            error=error,
            detail=detail,
            request_id=self.request_id,
        )

    def _failed(self, error: str, retry_after: float | None) -> float:
        self.last_error = error
        if self.attempts > self.policy.retries:
            raise self._give_up(f"retries exhausted (retries={self.policy.retries})")
        p = self.policy
        delay = backoff_delay(
            self.attempts, backoff=p.backoff, max_backoff=p.max_backoff, retry_after=retry_after, rand=self.rand
        )
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            # The next attempt would start after the deadline: give up now rather than sleep for nothing.
            raise self._give_up(f"deadline of {p.deadline:g} s reached")
        logger.warning(
            "%s: attempt %d failed (%s); retrying in %.2f s (request id %s)",
            self.what,
            self.attempts,
            error,
            delay,
            self.request_id,
        )
        return delay

    def _give_up(self, reason: str) -> MRCUnavailableError:
        elapsed = self.clock() - self.started
        n = self.attempts
        last = self.last_error or "none"
        return MRCUnavailableError(
            f"MRC service unavailable: {self.what} failed after {n} attempt{'s' if n != 1 else ''} "
            f"over {elapsed:.2f} s, {reason}; last error: {last} (request id {self.request_id})",
            attempts=n,
            elapsed=elapsed,
            last_error=self.last_error,
            request_id=self.request_id,
        )


# -- clients --------------------------------------------------------------------------------------------
class _ClientBase:
    """Configuration, request building and response decoding shared by both clients (no I/O)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float | None = 60.0,
        deadline: float | None = None,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        wire: Wire = "raw",
        max_grids_per_request: int = DEFAULT_MAX_GRIDS_PER_REQUEST,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        url = url.strip().rstrip("/")
        if url.endswith("/mrc"):  # accept the endpoint's URL as well as the service's
            url = url[: -len("/mrc")]
        if not re.match(r"https?://[^/]", url):
            raise ConfigError(f"the MRC service URL must start with http:// or https://, got {url!r}")
        if max_grids_per_request < 1:
            raise ConfigError(f"max_grids_per_request must be >= 1, got {max_grids_per_request}")
        if max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.url = url
        self.wire = _check_wire(wire)
        self.policy = RetryPolicy(
            retries=retries, backoff=backoff, max_backoff=max_backoff, deadline=deadline, timeout=timeout
        )
        self.max_grids_per_request = max_grids_per_request
        self.max_request_bytes = max_request_bytes
        self._headers = {"User-Agent": f"carve3d-reward-client/{__version__}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._http = self._make_http()

    def _make_http(self) -> Any:
        raise NotImplementedError

    def _prepare(self, grids: GridsInput, return_renders: bool, request_id: str | None) -> list[tuple[str, bytes, int]]:
        """Encode and split: ``[(request id, msgpack body, number of grids), ...]``."""
        base = _check_request_id(request_id)
        encoded = encode_grids(grids, self.wire)
        chunks = _chunk(encoded, self.max_grids_per_request, self.max_request_bytes)
        out = []
        longest = base if len(chunks) == 1 else f"{base}-{len(chunks) - 1}"
        if len(longest) > MAX_REQUEST_ID_LENGTH:
            raise InvalidInputError(
                f"request_id {base[:40]!r}... is too long for a batch sent as {len(chunks)} requests "
                f"('<id>-<index>' must be at most {MAX_REQUEST_ID_LENGTH} characters)"
            )
        for i, chunk in enumerate(chunks):
            rid = base if len(chunks) == 1 else f"{base}-{i}"
            body = {"grids": chunk, "return_renders": bool(return_renders), "request_id": rid}
            out.append((rid, msgpack.packb(body, use_bin_type=True), len(chunk)))
        return out

    def _post_headers(self, request_id: str) -> dict[str, str]:
        return {"Content-Type": MSGPACK, "Accept": MSGPACK, "X-Request-Id": request_id}

    def _attempts(self, what: str, request_id: str, started: float | None = None) -> _Attempts:
        return _Attempts(self.policy, what=what, request_id=request_id, started=started)

    @staticmethod
    def _decode_scores(resp: httpx.Response, request_id: str, n: int) -> list[ScoreResult]:
        ctype = resp.headers.get("content-type", "")
        try:
            if "json" in ctype:  # a service may answer JSON; bytes are base64 there
                body = json.loads(resp.content)
                for r in body.get("results", []) if isinstance(body, dict) else []:
                    if isinstance(r, dict) and r.get("renders"):
                        r["renders"] = [_b64(x) for x in r["renders"]]
            else:
                body = msgpack.unpackb(resp.content, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            preview = resp.content[:60]
            raise _malformed(
                f"the body is not a msgpack ScoreResponse ({type(exc).__name__}; content-type {ctype!r}, "
                f"{len(resp.content)} bytes starting {preview!r})",
                request_id,
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise _malformed(
                f"expected a ScoreResponse map with a 'results' list, got {type(body).__name__}", request_id
            )
        answered = body.get("request_id")
        if answered and answered != request_id:
            raise _malformed(f"the answer is for request id {answered!r}", request_id)
        results = body["results"]
        if len(results) != n:
            raise _malformed(f"{len(results)} results for {n} grids", request_id)
        return [_read_score(r, request_id) for r in results]

    @staticmethod
    def _decode_info(resp: httpx.Response) -> dict[str, Any]:
        try:
            body = json.loads(resp.content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _malformed("GET /v1/info did not answer a JSON object", "", status=resp.status_code)
        return body


def _b64(value: Any) -> bytes:
    import base64

    return base64.b64decode(value) if isinstance(value, str) else value


def _check_request_id(request_id: str | None) -> str:
    if request_id is None:
        return str(uuid.uuid4())
    if not is_valid_request_id(request_id):
        raise InvalidInputError(f"request_id must be {REQUEST_ID_RULE}, got {request_id!r:.80}")
    return request_id


class MRCClient(_ClientBase):
    """Synchronous client of the MRC reward service (see the module docstring for the retry policy).

    Args:
        url: the service's base URL, e.g. ``http://127.0.0.1:8080`` (``.../mrc`` is accepted too).
        token: sent as ``Authorization: Bearer <token>``.
        timeout: seconds for each network operation (connect, send, each read) of one attempt.
        deadline: seconds for a whole :meth:`score` call, every attempt and wait included (None: no limit).
        retries: retries after the first attempt of each request (at most ``retries + 1`` attempts).
        backoff, max_backoff: the exponential backoff's first cap and largest cap, in seconds.
        wire: ``"raw"`` (lossless raw pixels, default) or ``"png"`` (lossless PNG); never JPEG.
        max_grids_per_request, max_request_bytes: how a large batch is split into requests.
    """

    _http: httpx.Client

    def _make_http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self._headers, timeout=self.policy.timeout)

    def score(
        self, grids: GridsInput, *, return_renders: bool = False, request_id: str | None = None
    ) -> list[ScoreResult]:
        """Score grids (see :func:`encode_grids` for the accepted inputs); one result per grid, in order."""
        started = time.monotonic()
        results: list[ScoreResult] = []
        for rid, body, n in self._prepare(grids, return_renders, request_id):
            attempts = self._attempts(f"POST {self.url}/mrc", rid, started)
            resp = self._send(attempts, "POST", "/mrc", content=body, headers=self._post_headers(rid))
            results.extend(self._decode_scores(resp, rid, n))
        return results

    def ready(self) -> bool:
        """``GET /readyz``: True when the service takes requests (one attempt, never raises)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: metric id, version, limits... (retried like :meth:`score`)."""
        rid = str(uuid.uuid4())
        resp = self._send(
            self._attempts(f"GET {self.url}/v1/info", rid), "GET", "/v1/info", headers={"X-Request-Id": rid}
        )
        return self._decode_info(resp)

    def _send(self, attempts: _Attempts, method: str, path: str, **kwargs: Any) -> httpx.Response:
        while True:
            timeout = attempts.begin()
            try:
                resp = self._http.request(method, path, timeout=timeout, **kwargs)
            except httpx.TransportError as exc:
                delay = attempts.on_exception(exc)
            else:
                delay = attempts.on_response(resp)
                if delay is None:
                    return resp
            time.sleep(delay)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MRCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMRCClient(_ClientBase):
    """Asynchronous client (asyncio or trio): the same arguments and behaviour as :class:`MRCClient`.

    Encoding runs in a worker thread, so a big batch does not block the event loop; the requests
    of a split batch are sent one after the other.
    """

    _http: httpx.AsyncClient

    def _make_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.policy.timeout)

    async def score(
        self, grids: GridsInput, *, return_renders: bool = False, request_id: str | None = None
    ) -> list[ScoreResult]:
        """Score grids (see :func:`encode_grids` for the accepted inputs); one result per grid, in order."""
        started = time.monotonic()
        prepared = await anyio.to_thread.run_sync(self._prepare, grids, return_renders, request_id)
        results: list[ScoreResult] = []
        for rid, body, n in prepared:
            attempts = self._attempts(f"POST {self.url}/mrc", rid, started)
            resp = await self._send(attempts, "POST", "/mrc", content=body, headers=self._post_headers(rid))
            results.extend(self._decode_scores(resp, rid, n))
        return results

    async def ready(self) -> bool:
        """``GET /readyz``: True when the service takes requests (one attempt, never raises)."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def info(self) -> dict[str, Any]:
        """``GET /v1/info``: metric id, version, limits... (retried like :meth:`score`)."""
        rid = str(uuid.uuid4())
        resp = await self._send(
            self._attempts(f"GET {self.url}/v1/info", rid), "GET", "/v1/info", headers={"X-Request-Id": rid}
        )
        return self._decode_info(resp)

    async def _send(self, attempts: _Attempts, method: str, path: str, **kwargs: Any) -> httpx.Response:
        while True:
            timeout = attempts.begin()
            try:
                resp = await self._http.request(method, path, timeout=timeout, **kwargs)
            except httpx.TransportError as exc:
                delay = attempts.on_exception(exc)
            else:
                delay = attempts.on_response(resp)
                if delay is None:
                    return resp
            await anyio.sleep(delay)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMRCClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
