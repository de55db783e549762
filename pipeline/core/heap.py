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
from typing import Optional


@functools.lru_cache(maxsize=None)
def _libc(name: str, argtypes: tuple, restype):
    """A function of the C library already loaded into the process, or None (no such symbol: musl,
    macOS; no dlopen(NULL): Windows). No library search: ``ctypes.util.find_library`` runs ldconfig
    in a subprocess and could fail once and stay failed."""
    try:
        fn = getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def _trim():
    return _libc("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)


# glibc's mallopt parameter numbers (malloc.h) and the mmap threshold's ceiling on 64-bit: HEAP_MAX_SIZE / 2
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MAP_LARGE_MAX_BYTES = 32 * 2**20


def map_large(min_bytes: int, trim_bytes: Optional[int] = None) -> bool:
    """From now on, for the rest of the process, serve every C allocation of at least ``min_bytes``
    from its own mapping, unmapped when it is freed; True when the allocator took the setting (glibc).

    Why: glibc's default threshold adapts upwards (to the largest block freed so far, up to 32 MiB),
    so a training loop's activations of a few MiB to 32 MiB come from the heap, and the heap's
    fragmentation made resident memory wander by hundreds of MiB from one step to the next: the
    longer the epoch, the higher its peak, which then grew with the row count at a fixed batch
    size (bench/results/train_phases_stream_map.log). With a fixed threshold the resident memory
    follows the live tensors. The cost: such blocks are mapped and zero-filled afresh each time.
    Setting it also switches off glibc's adaptation; there is no call that turns it back on.
    ``mallopt`` has no wrapper in a maintained library, hence ctypes (as :func:`release`).

    ``trim_bytes``: also set the free space at the heap's top above which ``free`` hands pages
    back. glibc adapts it with the mmap threshold (twice it); a fixed mmap threshold leaves it at
    its 128 KiB default, so a phase that frees and reallocates heap blocks of a few MiB returns
    and faults its pages back on every round: the cold snapshot's data-gate columns took 9.2-9.5
    s instead of 7.0-7.2 (bench/results/data_stages_map_large_1m.log). None keeps it."""
    min_bytes = int(min_bytes)
    if not 0 < min_bytes <= MAP_LARGE_MAX_BYTES:
        raise ValueError(f"map_large: {min_bytes} bytes is outside 1..{MAP_LARGE_MAX_BYTES} (glibc's ceiling)")
    if trim_bytes is not None and not 0 <= int(trim_bytes) < 2**31:
        raise ValueError(f"map_large: trim_bytes {trim_bytes} is outside 0..2**31-1 (mallopt takes an int)")
    fn = _libc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if fn is None or fn(_M_MMAP_THRESHOLD, min_bytes) != 1:
        return False
    return trim_bytes is None or fn(_M_TRIM_THRESHOLD, int(trim_bytes)) == 1


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
