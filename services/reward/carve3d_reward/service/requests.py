"""Request decoding: an HTTP request -> the grids it holds, each decoded or with the reason it is not.

What belongs to whom:

* the **envelope** (content type, msgpack/JSON/multipart framing, the
  ``grids`` list, ``return_renders``, the number of grids and the request's
  total pixels) belongs to the request: a problem there answers the whole
  request with a 4xx;
* everything **inside one grid entry** (its bytes, format, pixel mode, size,
  ``shape``, ``dtype``, base64) belongs to that grid: it becomes that grid's
  ``invalid`` result and the other grids are scored. A single-image body is a
  request of one grid, so its grid's problem is the request's 4xx.

Work is bounded before it is done: the body by ``max_body_bytes``; each
grid's pixels by ``max_pixels`` and the request's by ``max_request_pixels``,
both read from image headers and raw shapes before any pixel is decoded; at
most ``decode_threads`` grids are decoded at once across all requests, each
reduced to the metric's working resolution as it is decoded
(:func:`carve3d_reward.grid.grid_from_image`). So what a request costs in
memory is a function of these limits, not of how well its images compress.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.to_thread
import msgpack
import numpy as np
from fastapi import Request
from PIL import Image

from ..errors import InvalidInputError, TooManyPixelsError, UnsupportedFormatError
from ..grid import ACCEPTED_FORMATS, grid_from_array, grid_from_image, open_image
from ..layouts import GridLayout
from .errors import APIError
from .memory import release_memory
from .settings import ServiceSettings

log = logging.getLogger("carve3d_reward.service")

#: ``image/png`` -> ``PNG``: the single-image content types, each with the one format it may hold.
IMAGE_TYPES: dict[str, str] = {media: fmt for fmt, media in ACCEPTED_FORMATS.items()}
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
SUPPORTED_TYPES = (*IMAGE_TYPES, MULTIPART_TYPE, "application/msgpack", JSON_TYPE)
#: After decoding this many pixels in one request, freed memory is handed back to the OS.
RELEASE_AFTER_PIXELS = 4 << 20
_TRUE, _FALSE = frozenset({"1", "true", "yes"}), frozenset({"0", "false", "no", ""})

Kind = Literal["image", "multipart", "structured"]
#: One grid entry between the steps: image bytes, an opened image (header read), raw pixels, or why it is unusable.
Entry = bytes | Image.Image | np.ndarray | InvalidInputError


@dataclass(frozen=True)
class RequestOptions:
    """What the headers and the query say about a request, known before its body is read."""

    content_type: str  # the header as sent (a multipart boundary changes how the same body parses)
    media_type: str  # its lower-cased media type
    kind: Kind
    renders_query: bool  # ?return_renders=true
    reply_msgpack: bool


@dataclass
class ParsedRequest:
    """A request's grids in order: each a ``uint8 [H, W, 3]`` grid at the working resolution, or its error."""

    options: RequestOptions
    grids: list[np.ndarray | InvalidInputError]
    return_renders: bool


def request_options(request: Request) -> RequestOptions:
    """Read the content type, ``Accept`` and ``?return_renders``; 415 for a content type we do not take."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    accept = request.headers.get("accept", "").lower()
    raw_renders = request.query_params.get("return_renders", "").strip().lower()
    if raw_renders not in _TRUE | _FALSE:
        raise APIError(400, "bad_request", f"?return_renders must be true or false, got {raw_renders[:40]!r}")
    renders = raw_renders in _TRUE
    if media in IMAGE_TYPES:
        return RequestOptions(content_type, media, "image", renders, False)
    if media == MULTIPART_TYPE:
        return RequestOptions(content_type, media, "multipart", renders, False)
    if media in MSGPACK_TYPES:
        return RequestOptions(content_type, media, "structured", renders, JSON_TYPE not in accept)
    if media == JSON_TYPE:
        return RequestOptions(content_type, media, "structured", renders, "msgpack" in accept)
    raise APIError(
        415,
        "unsupported_media_type",
        f"Content-Type {media or '(none)'!r} is not supported; use {', '.join(SUPPORTED_TYPES)}",
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise APIError(400, "bad_request", "invalid Content-Length header") from None
        if too_big:
            raise APIError(413, "too_large", f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, "too_large", f"the body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let request.form() parse what was already read
    return body


class RequestDecoder:
    """Turns requests into grids at the working resolution, within the service's limits."""

    def __init__(self, settings: ServiceSettings, layout: GridLayout, view_size: int | None) -> None:
        self.settings = settings
        self.layout = layout
        self.view_size = view_size
        self._decode_slots = anyio.CapacityLimiter(settings.decode_threads)

    async def decode(self, request: Request, body: bytes, options: RequestOptions) -> ParsedRequest:
        renders = options.renders_query
        if options.kind == "image":
            if not body:
                raise APIError(400, "bad_request", "empty body: send one PNG, JPEG or WebP grid")
            entries: list[Entry] = [body]
        elif options.kind == "multipart":
            entries = list(await self._multipart(request))
        else:
            entries, in_body = await anyio.to_thread.run_sync(self._structured, body, options.media_type)
            renders = renders or in_body
        entries = await anyio.to_thread.run_sync(self._open_all, entries, options)
        grids: list[np.ndarray | InvalidInputError] = []
        for entry in entries:  # one at a time: concurrent requests share the decode slots fairly
            grids.append(await anyio.to_thread.run_sync(self._decode_one, entry, limiter=self._decode_slots))
        if options.kind == "image" and isinstance(grids[0], InvalidInputError):
            raise APIError.from_input_error(grids[0])
        return ParsedRequest(options, grids, renders)

    # -- the envelope ----------------------------------------------------------------------------------
    async def _multipart(self, request: Request) -> list[bytes]:
        limit = self.settings.max_grids
        try:
            form = await request.form(max_files=limit, max_fields=limit + 8)
        except Exception as exc:  # noqa: BLE001 - malformed multipart bodies raise various errors
            detail = getattr(exc, "detail", None) or str(exc) or "it cannot be parsed"
            raise APIError(400, "bad_multipart", f"malformed multipart body: {detail}") from None
        try:
            files = [value for _, value in form.multi_items() if not isinstance(value, str)]
            if not files:
                raise APIError(400, "bad_request", "the multipart body holds no files: send each grid as a file part")
            return [await f.read() for f in files]
        finally:
            await form.close()

    def _structured(self, body: bytes, media_type: str) -> tuple[list[Entry], bool]:
        from_json = media_type == JSON_TYPE
        payload = _unpack_json(body) if from_json else _unpack_msgpack(body, self.settings)
        if not isinstance(payload, dict) or not isinstance(payload.get("grids"), list):
            raise APIError(400, "bad_request", "the body must be a map with a 'grids' list (see proto/mrc.proto)")
        items = payload["grids"]
        if not items:
            raise APIError(400, "bad_request", "'grids' is empty")
        if len(items) > self.settings.max_grids:
            raise APIError(
                413, "too_many_grids", f"{len(items)} grids in one request; the limit is {self.settings.max_grids}"
            )
        renders = payload.get("return_renders", False)
        if not isinstance(renders, bool):
            raise APIError(400, "bad_request", "'return_renders' must be a boolean")
        return [_guard(functools.partial(self._entry, item, from_json)) for item in items], renders

    def _entry(self, item: Any, from_json: bool) -> bytes | np.ndarray:
        """One ``grids[i]`` map -> image bytes or raw pixels (``InvalidInputError`` names what is wrong)."""
        if not isinstance(item, dict):
            raise InvalidInputError("a grid entry must be a map with 'image' or 'data'")
        image, data = (_base64(item, key) if from_json else item.get(key) for key in ("image", "data"))
        if image is not None and data is not None:
            raise InvalidInputError("a grid entry has both 'image' and 'data'; send one of them")
        if image is not None:
            if not isinstance(image, bytes | bytearray):
                raise InvalidInputError("'image' must be bytes (PNG, JPEG or WebP)")
            return bytes(image)
        if data is not None:
            return self._raw(item, data)
        raise InvalidInputError("a grid entry has neither 'image' nor 'data'")

    def _raw(self, item: dict[str, Any], data: Any) -> np.ndarray:
        shape, dtype = item.get("shape"), item.get("dtype", "uint8")
        if not isinstance(data, bytes | bytearray):
            raise InvalidInputError("'data' must be bytes of raw uint8 pixels")
        if dtype != "uint8":
            raise InvalidInputError(f"dtype {_show(dtype)} is not supported; send 'uint8' pixels")
        # type(x) is int: a bool is an int to isinstance, and [true, true, 3] is not a shape
        if not (isinstance(shape, list | tuple) and len(shape) == 3 and all(type(x) is int and x > 0 for x in shape)):
            raise InvalidInputError(f"'shape' must be [H, W, 3] positive integers, got {_show(shape)}")
        h, w, c = shape
        if c != 3:
            raise InvalidInputError(f"expected 3 colour channels, got shape {list(shape)}")
        if h * w > self.settings.max_pixels:
            raise TooManyPixelsError(f"{w}x{h} pixels is more than the limit of {self.settings.max_pixels}")
        if len(data) != h * w * c:
            raise InvalidInputError(f"shape {list(shape)} needs {h * w * c} bytes of uint8, got {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, c)

    # -- headers, budget, pixels -----------------------------------------------------------------------
    def _open_all(self, entries: list[Entry], options: RequestOptions) -> list[Entry]:
        """Read every image's header; refuse the request if its grids hold more pixels than allowed."""
        opened: list[Entry] = []
        total = 0
        for entry in entries:
            if isinstance(entry, bytes):
                try:
                    entry = open_image(entry, max_pixels=self.settings.max_pixels)
                    if options.kind == "image":
                        _check_declared_format(entry, options.media_type)
                except InvalidInputError as exc:
                    if options.kind == "image":
                        raise APIError.from_input_error(exc) from None
                    entry = exc
            if isinstance(entry, Image.Image):
                total += entry.size[0] * entry.size[1]
            elif isinstance(entry, np.ndarray):
                total += entry.shape[0] * entry.shape[1]
            opened.append(entry)
        limit = self.settings.max_request_pixels
        if total > limit:
            raise APIError(
                413, "too_large", f"the request's grids hold {total} pixels in all, more than the limit of {limit}"
            )
        return opened

    def _decode_one(self, entry: Entry) -> np.ndarray | InvalidInputError:
        if isinstance(entry, InvalidInputError):
            return entry
        try:
            if isinstance(entry, Image.Image):
                return grid_from_image(entry, self.layout, view_size=self.view_size)
            assert isinstance(entry, np.ndarray)
            return grid_from_array(entry, self.layout, view_size=self.view_size)
        except InvalidInputError as exc:
            return exc
        finally:
            if isinstance(entry, Image.Image):
                entry.close()  # frees the decoded pixels now, not when the garbage collector gets to them
                if entry.size[0] * entry.size[1] >= RELEASE_AFTER_PIXELS:
                    release_memory()


def _guard(fn: functools.partial[bytes | np.ndarray]) -> Entry:
    try:
        return fn()
    except InvalidInputError as exc:
        return exc


def _check_declared_format(img: Image.Image, media_type: str) -> None:
    declared = IMAGE_TYPES[media_type]
    if img.format != declared:
        raise UnsupportedFormatError(f"the body is a {img.format} image but Content-Type says {media_type}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _base64(item: dict[str, Any], key: str) -> Any:
    value = item.get(key)
    if not isinstance(value, str):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"'{key}' is not valid base64") from None


def _unpack_msgpack(body: bytes, settings: ServiceSettings) -> Any:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=settings.max_body_bytes,
            max_str_len=1 << 20,
            max_array_len=max(settings.max_grids, 16),
            max_map_len=64,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        reason = "there are bytes after the end of the message"
    except msgpack.StackError:
        reason = "it is nested too deeply"
    except msgpack.FormatError:
        reason = "it holds a byte that is not msgpack"
    except UnicodeDecodeError:
        reason = "a string is not valid UTF-8"
    except (ValueError, TypeError) as exc:
        text = str(exc)
        reason = "extension types are not accepted" if "max_ext_len" in text else text or "it cannot be decoded"
    raise APIError(400, "bad_msgpack", f"the body is not valid msgpack: {reason}")


def _unpack_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        reason = "it is nested too deeply"
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc)
    raise APIError(400, "bad_json", f"the body is not valid JSON: {reason}")
