"""The parts of the wire contract (``proto/mrc.proto``) that the service and the client share."""

from __future__ import annotations

import re

#: The longest ``X-Request-Id`` the service takes; a longer one is refused (400), never truncated.
MAX_REQUEST_ID_LENGTH = 128
#: Printable ASCII without spaces: safe in a header, a log line and a cache key.
REQUEST_ID_PATTERN = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_LENGTH}}}")
REQUEST_ID_RULE = f"1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters without spaces"


def is_valid_request_id(value: object) -> bool:
    return isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value) is not None
