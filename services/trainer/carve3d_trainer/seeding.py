"""Seeds derived from names, so every random stream of a run is a function of ``(seed, what, epoch, process)``.

That is what makes a resumed run draw exactly the samples of an uninterrupted one, and what lets every
process of a run agree on a round's prompts without communicating.
"""

from __future__ import annotations

import hashlib
import json


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (compared as strings): the same parts, the same seed, on any machine."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
