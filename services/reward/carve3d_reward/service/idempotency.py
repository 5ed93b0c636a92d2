"""Idempotent retries: a request repeated with the same ``X-Request-Id`` is answered from its first computation.

The key covers everything that changes the answer, not just the id: the body,
its content type (a multipart boundary changes how the same bytes parse), the
``return_renders`` query flag and the reply format (msgpack or JSON). A retry
that differs in any of them is computed afresh, never answered with the
wrong result. A result is remembered for ``ttl_s`` seconds and at most
``max_entries`` ids; errors are not remembered, so a retry after a 503 or 504
computes again. The entry holds a future, so a retry that arrives while the
first computation is still running waits for it instead of scoring twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from typing import Any

from .requests import RequestOptions


class IdempotencyCache:
    """Recent answers by :meth:`key`; the oldest are forgotten first."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(request_id: str, options: RequestOptions, body: bytes) -> str:
        """One digest of the id and everything else that changes the answer."""
        h = hashlib.sha256()
        for part in (
            request_id,
            options.content_type,
            "renders" if options.renders_query else "",
            "msgpack" if options.reply_msgpack else "json",
        ):
            h.update(part.encode("utf-8", "surrogateescape") + b"\x00")
        h.update(body)
        return h.hexdigest()

    def get(self, key: str) -> asyncio.Future[Any] | None:
        """The answer (or the computation in progress) for ``key``, if remembered and not expired."""
        now = time.monotonic()
        while self._entries:  # expire the oldest
            oldest, (stamp, _) = next(iter(self._entries.items()))
            if now - stamp <= self.ttl_s:
                break
            self._entries.pop(oldest)
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def put(self, key: str, future: asyncio.Future[Any]) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = (time.monotonic(), future)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)
