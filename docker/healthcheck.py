"""Container health check: exit 0 when the reward service's /readyz answers 200, 1 otherwise.

Standard library only (the images have no curl). Reads ``MRC_PORT`` (default 8080) and sends
``MRC_AUTH_TOKEN`` as a bearer token when it is set (needed only with ``MRC_OPEN_HEALTH=false``).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("MRC_PORT", "8080")
    url = os.environ.get("HEALTHCHECK_URL", f"http://127.0.0.1:{port}/readyz")
    request = urllib.request.Request(url)
    token = os.environ.get("MRC_AUTH_TOKEN", "")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"not ready: {url}: HTTP {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
