"""glibc heap settings for loops that allocate and free large tensors at every iteration."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch


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


def cat_freeing(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts) (first dimension, the layout of the first part), emptying `parts` as it
    copies: the rows are held once plus one part, where torch.cat held them twice at the end
    (layer-wise AdaQuant on ResNet-50, 512 images, a 4 GB budget: 8.3 GB RSS when stopped unfinished;
    7.8 GB at the end with this, benchmarks/results/reconstruct_memory.json)."""
    first = parts[0]
    layout = torch.channels_last if first.dim() == 4 and first.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    full = torch.empty((sum(len(p) for p in parts), *first.shape[1:]), dtype=first.dtype, device=first.device,
                       memory_format=layout)
    parts.reverse()  # (pop from the end: each part is released as soon as it is copied)
    start = 0
    while parts:
        part = parts.pop()
        full[start:start + len(part)] = part
        start += len(part)
        del part
    return full


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
