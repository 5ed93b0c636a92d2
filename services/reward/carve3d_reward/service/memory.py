"""Handing freed memory back to the OS.

glibc keeps memory freed by a thread in that thread's arena for reuse; after
a large decode or batch it would stay resident for the life of the process.
``malloc_trim`` returns it. Called where the service has just finished
something large (a huge grid decoded, the scorer going idle), never per grid.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_memory() -> None:
    """Hand memory freed after a large decode back to the OS (glibc keeps it otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
