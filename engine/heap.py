"""Give the heap's free pages back to the OS after loading.

Loading a quantized model builds temporaries (repacked blocks, tiles) several times the size of
the weights; glibc keeps freed memory for reuse, so without this a served process would carry
~100 MB of free heap for its whole life. No-op where the C library is not glibc.
"""
from __future__ import annotations

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
