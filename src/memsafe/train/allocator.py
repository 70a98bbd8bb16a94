"""glibc's malloc told to keep the large buffers a CPU training step frees, instead of returning them to the
kernel and faulting fresh zeroed pages back in on the next step.

glibc serves an allocation above its mmap threshold with new pages and unmaps them when it is freed; it moves the
threshold (and the heap's trim threshold) with the largest such buffer the process has freed so far. So the pace
of a CPU step depends on what the process freed before: the same model stepped up to 25 % slower with every large
buffer mapped afresh, and two runs of one model with different histories (a driver's round buffers) stepped about
5 % apart (docs/research/iet-agc.md, 2026-12-07 thirteenth). Fixed high thresholds make every run reuse its heap.
The numbers a step computes do not change; the process keeps its peak memory.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound on 64-bit: larger buffers are always mapped afresh
TRIM_THRESHOLD = 2**30  # free memory at the heap's top kept up to this, rather than handed back


def keep_freed_memory() -> bool:
    """Sets the two thresholds for this process; False where its C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
