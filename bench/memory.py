"""Peak host memory of a stretch of code (Linux): the resident set's high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs`` after freed memory went back to the OS (``malloc_trim``). Used by the CPU benchmarks."""
from __future__ import annotations

import ctypes
import gc


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ``RssAnon``...) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Return freed memory to the OS and restart the high-water mark; the resident bytes now (the base that
    :func:`peak_rss_growth` subtracts)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status_bytes("VmRSS")


def peak_rss_growth(base: int) -> int:
    """Peak resident bytes since :func:`reset_peak_rss` above its ``base``."""
    return status_bytes("VmHWM") - base
