"""Handing freed heap memory back to the operating system between phases of long work.

glibc's malloc keeps what a process freed (to reuse it) unless the free space sits at the top of
the heap: one live object above a freed 100 MB region pins the whole region in the process's
resident memory. A stage that runs phases one after another (the inspect stage: a clean model, a
detector over every training row, three k-fold fits, two scans) then peaks at the sum of what its
phases left behind, not at its largest phase (inspect at 100k rows, stop 28's code, held ~0.7 GB
of freed memory through its k-fold fits: bench/results/scale_inspect_100k_malloc.log). ``malloc_trim(0)`` returns
every whole free page of every arena (glibc >= 2.8 madvises free chunks in the middle of the heap
too), in milliseconds. No maintained library wraps it (psutil reads memory, it does not release
it), hence ctypes. Elsewhere (musl, macOS, Windows) this is a no-op: their allocators differ.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.lru_cache(maxsize=1)
def _trim():
    # The symbols already loaded into the process (libc's among them): no library search, which
    # (ctypes.util.find_library) runs ldconfig in a subprocess and could fail once and stay failed.
    try:
        fn = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no dlopen(NULL) (Windows)
        return None
    if fn is not None:  # None: a libc without malloc_trim (musl, macOS)
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release() -> bool:
    """Return the C heap's free pages to the OS; True when the allocator supports it (glibc).

    When pyarrow is loaded its pool is asked too. The stages run Arrow on the system allocator
    (``pipeline/__init__``), which the trim reaches; but a setting in the environment wins, and a
    process that imported pyarrow before ``pipeline`` keeps Arrow's default, mimalloc, which holds
    freed buffers until asked (200 MiB of freed 100 kB buffers stayed resident through a trim,
    tests/test_core.py). The compute core does not import pyarrow itself."""
    pa = sys.modules.get("pyarrow")
    if pa is not None and hasattr(pa, "default_memory_pool"):
        pa.default_memory_pool().release_unused()
    fn = _trim()
    if fn is None:
        return False
    fn(0)
    return True
