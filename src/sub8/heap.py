"""glibc heap settings for loops that allocate and free large tensors at every iteration."""

from __future__ import annotations

import contextlib
import ctypes
import sys


@contextlib.contextmanager
def reuse_freed_memory():
    """Keep freed memory in the process while a hot loop runs (glibc only).

    Each iteration allocates and frees mini-batch-sized tensors (tens of MB). glibc serves
    those with fresh mmaps and returns them on free, so every iteration page-faults all of its
    memory in again: on 2 CPU cores that took over half of the iteration time. Raising the
    mmap and trim thresholds lets the heap reuse the blocks; the defaults come back afterwards
    and the heap is trimmed.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_threshold, default = -1, -3, 128 * 1024
    libc.mallopt(m_mmap_threshold, 2 ** 31 - 1)
    libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, default)
        libc.mallopt(m_trim_threshold, default)
        libc.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
