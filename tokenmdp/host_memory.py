"""``train.release_memory``: hand the memory of freed large tensors back to the system.

On Linux, glibc's ``malloc`` serves a large block from its own mapping (returned to the
system when freed) only while the block is above a threshold that it raises to the size of
every such block freed, up to 32 MiB. After the first training step, most of a step's
activations (tensors of 1 to 32 MiB) therefore come from the heap, and the heap keeps them:
on Gemma-3 270M + LoRA (bench/logits_memory.py's step) the resident size stays 1.6 GiB
above what the tensors alive at the forward's end need. A fixed threshold of 1 MiB gives
each such tensor its own mapping: the resident peak follows the tensors that are alive, at
the cost of a system call and fresh pages per allocation (2-10% of the step, measured in
docs/performance.md). The setting is the process's: it stays for the rest of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

#: glibc's ``mallopt`` parameter number for the mapping threshold (malloc.h).
M_MMAP_THRESHOLD = -3
#: The threshold ``train.release_memory`` sets: blocks of 1 MiB and more get their own mapping.
THRESHOLD_BYTES = 1 << 20


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def release_freed_memory() -> bool:
    """Set glibc's mapping threshold to :data:`THRESHOLD_BYTES`; whether it took."""
    libc = glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
