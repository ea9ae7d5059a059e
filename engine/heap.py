"""The heap after loading: free pages back to the OS, long-lived objects out of the collector's way.

Loading a quantized model builds temporaries (repacked blocks, tiles) several times the size of
the weights; glibc keeps freed memory for reuse, so without this a served process would carry
~100 MB of free heap for its whole life. No-op where the C library is not glibc.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc


def release_free_memory() -> None:
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def freeze_loaded_objects() -> None:
    """Move every object alive now (modules, the model's Python objects, the server's app) into
    the collector's permanent generation: full collections during decoding then walk only what
    requests create (they were ~5% of a 16-row step's CPU time here, `perf`). Unfrozen at exit, so
    that the interpreter's last collections still free them (extension modules such as triton's
    report objects that outlive them as leaks)."""
    gc.freeze()
    atexit.register(gc.unfreeze)
