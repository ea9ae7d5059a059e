"""Compile, cache and open the C++ kernels (see `engine/native/__init__.py`)."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from engine.loader import cache_root

log = logging.getLogger("skipserve.native")

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
_int, _float, _ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    # q, k_new, v_new, k_cache, v_cache, block_tables, lengths, out, rows, heads, kv_heads, dim, block_size,
    # max_blocks, window, scale, threads
    "decode_attention_f32": [_ptr] * 8 + [_int] * 7 + [_float, _int],
    # x, w, bias (or None), y, rows, in, out, threads
    "linear_f32": [_ptr, _ptr, _ptr, _ptr, _int, _int, _int, _int],
    "linear_bf16": [_ptr, _ptr, _ptr, _ptr, _int, _int, _int, _int],
    # x, weight, out, rows, dim, eps, threads
    "rms_norm_f32": [_ptr, _ptr, _ptr, ctypes.c_int64, _int, _float, _int],
    # gate_up, out, rows, inter, threads
    "silu_mul_f32": [_ptr, _ptr, ctypes.c_int64, _int, _int],
    # x, cos, sin, tokens, heads, dim, token_stride, head_stride, threads
    "rope_f32": [_ptr, _ptr, _ptr, ctypes.c_int64, _int, _int, ctypes.c_int64, ctypes.c_int64, _int],
    # x, layer_ptrs, layers, weights_bf16, cos, sin, block_tables, lengths, rows, hidden, heads, kv_heads,
    # head_dim, inter, block_size, max_blocks, eps, scale, threads
    "llama_decode_layers": [_ptr, _ptr, _int, _int, _ptr, _ptr, _ptr, _ptr] + [_int] * 8 + [_float, _float, _int],
    # x, layer_ptrs_row, weights_bf16, cos, sin, block_tables, lengths, out, rows, hidden, heads, kv_heads,
    # head_dim, block_size, max_blocks, eps, scale, threads
    "llama_attention_branch": [_ptr] * 2 + [_int] + [_ptr] * 5 + [_int] * 7 + [_float, _float, _int],
    # h, layer_ptrs_row, weights_bf16, out, rows, hidden, inter, eps, threads
    "llama_ffn_branch": [_ptr, _ptr, _int, _ptr, _int, _int, _int, _float, _int],
    "linear_f32_vectorized": [],
    "linear_bf16_vectorized": [],
}
RESTYPES = {"linear_f32_vectorized": ctypes.c_int, "linear_bf16_vectorized": ctypes.c_int}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_disabled = False


def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None (not loaded, unavailable or disabled)."""
    return None if _disabled else _lib


@contextlib.contextmanager
def disabled():
    """Inside, `kernels()` is None, process-wide: a model built and run there uses the torch paths
    only (for side-by-side benchmarks in one process). Layers keep the GEMM backend they were
    built with; the other ops choose at each call."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


def load(cache_dir: str | None = None) -> ctypes.CDLL | None:
    """Build (first time on this machine) and open the kernels; None when they are unavailable."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SKIPSERVE_NATIVE", "1") == "0":
            log.info("native CPU kernels disabled (SKIPSERVE_NATIVE=0)")
            return None
        try:
            path = _build(Path(cache_root(cache_dir)) / "native")
            lib = ctypes.CDLL(str(path))
            for name, args in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, RESTYPES.get(name)
            _lib = lib
            log.info("native CPU kernels: %s", path)
        except Exception as exc:  # no compiler, a failed build, an unloadable library: torch paths
            log.warning("native CPU kernels unavailable (%s); using torch kernels", exc)
        return _lib


def _compiler() -> str:
    """g++ only: its -fopenmp links libgomp.so.1, which resolves to the copy torch has loaded; another
    compiler's OpenMP runtime would start a second thread team (see engine/async_engine.py)."""
    cxx = shutil.which("g++")
    if not cxx:
        raise RuntimeError("no g++ found")
    return cxx


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(root: Path) -> Path:
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in [version, " ".join(FLAGS), _cpu_signature()] + [p.read_text() for p in SOURCES + HEADERS]:
        digest.update(part.encode())
    target = root / f"skipserve_native-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("compiling native CPU kernels -> %s", target)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent start sees all of it or none
    return target
