"""CPU kernels in C++ for what torch runs slowly at decode sizes, built once per machine.

`load(cache_dir)` compiles `*.cpp` here with the system's g++ (`-O3 -march=native -fopenmp`) into
the cache directory, keyed by the sources, the compiler and the CPU, and opens the library with
ctypes; later starts reuse it. The kernels run on torch's own OpenMP runtime (the library's
`libgomp.so.1` resolves to the one torch already loaded), so they share torch's thread team.
Without a compiler, on a failed build, or with `SKIPSERVE_NATIVE=0`, `kernels()` is None and the
callers use their torch path.
"""
from __future__ import annotations

from engine.native.build import disabled, kernels, load

__all__ = ["disabled", "kernels", "load"]
