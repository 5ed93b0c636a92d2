"""Encoding an answer: a request's scores as the reply its client asked for (``proto/mrc.proto``).

An image body is answered with one JSON ``GridScore``; a multipart, msgpack or
JSON request with a ``ScoreResponse``, as msgpack or JSON by
:attr:`~.requests.RequestOptions.reply_msgpack`. Bytes are raw in msgpack and
base64 in JSON.
"""

from __future__ import annotations

import base64
from typing import Any

import msgpack
from fastapi import Response
from fastapi.responses import JSONResponse

from ..scores import GridScore
from .requests import ParsedRequest


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray):
        return base64.b64encode(obj).decode()
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    return obj


def respond(reply: tuple[ParsedRequest, list[GridScore]], request_id: str) -> Response:
    parsed, scores = reply
    if parsed.options.kind == "image":
        return JSONResponse(to_jsonable(scores[0].to_wire()))
    metric = next((r.metric for r in scores if r.metric), "")
    payload = {"results": [r.to_wire() for r in scores], "request_id": request_id, "metric": metric}
    if parsed.options.reply_msgpack:
        return Response(msgpack.packb(payload, use_bin_type=True), media_type="application/msgpack")
    return JSONResponse(to_jsonable(payload))
