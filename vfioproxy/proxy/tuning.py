"""Process-wide tuning for a proxy process.

glibc serves allocations above its mmap threshold (128 KiB at first) with a
fresh ``mmap`` and gives them back with ``munmap`` when freed. A proxy that
forwards and decodes 1 MiB messages allocates and frees several such buffers
per message, and every fresh mapping costs a page fault per 4 KiB page on
first touch: measured, that took 1 MiB REGION_READs through the decoding
proxy from 2800 to 630 MiB/s. Raising the threshold above the largest
message (and the trim threshold with it) keeps those buffers in the heap.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["tune_allocator"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: above the largest message (1 MiB of data plus its header) and a copy or two
MMAP_THRESHOLD = 4 * 1024 * 1024
#: how much freed heap glibc may keep before giving memory back to the system
TRIM_THRESHOLD = 32 * 1024 * 1024


def tune_allocator() -> bool:
    """Keep message-sized buffers in the heap (glibc); False where that is not possible."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.debug("mallopt refused the thresholds; allocator left as it is")
    return ok
