"""The HTTP server under the app: uvicorn's h11 protocol, answering broken framing in the API's error format.

uvicorn answers a request it cannot parse (a bad request line, header or
chunked framing; headers over its size limit) with a plain-text 400 before
the app sees it. Here that answer is the service's JSON error like every
other, so a client parses one error format.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body


class JSONErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the service's JSON 400 for malformed HTTP."""

    def send_400_response(self, msg: str) -> None:
        request_id = uuid.uuid4().hex
        detail = "malformed HTTP request: its request line, headers or body framing cannot be parsed"
        body = json.dumps(error_body("bad_http", detail, request_id)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response had already begun on this connection: nothing more can be said on it
        self.transport.close()


def server_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config for the service (``kwargs`` as for :class:`uvicorn.Config`)."""
    return uvicorn.Config(app, http=JSONErrorH11Protocol, **kwargs)
