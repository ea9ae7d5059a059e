"""Memory after loading: free heap back to the OS, start-up code out of the resident set,
long-lived objects out of the collector's way.

Loading a quantized model builds temporaries (repacked blocks, tiles) several times the size of
the weights; glibc keeps freed memory for reuse, so without this a served process would carry
~100 MB of free heap for its whole life (`release_free_memory`: a no-op where the C library is
not glibc).
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import os
import re
import stat

_MADV_DONTNEED = 4
_OWN_PAGES = ("Anonymous", "Swap", "Private_Dirty")  # smaps fields of pages only this mapping holds
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+ *(.*)$")


def release_free_memory() -> None:
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def drop_unwritten_file_pages() -> int:
    """Drop from the page tables the resident pages of read-only file mappings the process never
    wrote (libraries' code and constants, ~80 MB of torch's alone after import, most of it run
    once by their initialisers) -> bytes dropped. The mappings stay; their pages stay in the page
    cache and come back on the next touch, exactly as after the kernel's own reclaim of clean file
    pages: nothing is lost. Pages another thread touches meanwhile just fault back in.

    Only private mappings of regular files with no write permission and no page of their own
    (copied on write: none resident, swapped or dirty) qualify: a relocated segment made read-only
    afterwards holds such copies and is left alone, as are devices (a GPU driver's mappings) and
    anything writable. Linux only (/proc/self/smaps); 0 elsewhere."""
    try:
        smaps = open("/proc/self/smaps")
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    candidates, current = [], None
    with smaps:
        for line in smaps:
            m = _MAPPING.match(line)
            if m:
                start, end, perms, path = int(m[1], 16), int(m[2], 16), m[3], m[4]
                current = None
                if perms[1] == "-" and perms[3] == "p" and path.startswith("/") and _regular_file(path):
                    current = {"start": start, "end": end, "Rss": 0, "owned": 0}
                    candidates.append(current)
            elif current is not None:
                key, _, rest = line.partition(":")
                if key == "Rss":
                    current["Rss"] = int(rest.split()[0]) * 1024
                elif key in _OWN_PAGES:
                    current["owned"] += int(rest.split()[0])
    dropped = 0
    for c in candidates:
        if c["Rss"] and not c["owned"] and madvise(c["start"], c["end"] - c["start"], _MADV_DONTNEED) == 0:
            dropped += c["Rss"]
    return dropped


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # deleted since it was mapped, or not a path at all
        return False


def freeze_loaded_objects() -> None:
    """Move every object alive now (modules, the model's Python objects, the server's app) into
    the collector's permanent generation: full collections during decoding then walk only what
    requests create (they were ~5% of a 16-row step's CPU time here, `perf`). Unfrozen at exit, so
    that the interpreter's last collections still free them (extension modules such as triton's
    report objects that outlive them as leaks)."""
    gc.freeze()
    atexit.register(gc.unfreeze)
