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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.loader import cache_root

log = logging.getLogger("skipserve.native")

HERE = Path(__file__).parent
# Sources compiled once per instruction set, each defining QUANT_ISA (its functions' suffix); the
# caller picks at run time what the CPU runs, so every x86 host builds (and tests) both.
ISA_VARIANTS = {"quant_linear.cpp": {"avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4", "-mavx512vnni"]}}
SOURCES = sorted(p for p in HERE.glob("*.cpp") if p.name not in ISA_VARIANTS)
HEADERS = sorted(HERE.glob("*.h"))
# -fno-trapping-math lets GCC if-convert and vectorize loops whose compares and float-to-int
# conversions could trap (fast_exp.h's clamp and exponent, in the softmax); it changes no result,
# only whether a trap could fire, and nothing here enables traps.
FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fPIC", "-shared", "-std=c++17"]
# Instruction sets a whole library is built for. "native" (the default) is whatever this CPU has:
# the kernels choose their AVX-512 / AVX512-BF16 / AVX2 + FMA paths at compile time, on the machine
# that runs them. "avx2" (x86-64-v3: AVX2, FMA, F16C, no AVX-512) builds what an AVX2-only host
# runs, so that path is tested on any x86 host; SKIPSERVE_CPU_ISA=avx2 makes a whole process behave
# as on such a host (see `emulated_isa`). "avx512" (x86-64-v4: AVX-512 F/BW/VL/DQ/CD, no AVX512-BF16)
# builds the paths an AVX-512 host without AVX512-BF16 runs, for the tests on hosts that have it.
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mtune=generic"],
             "avx512": ["-march=x86-64-v4", "-mtune=generic"]}
EMULATED = ("avx2",)  # the SKIPSERVE_CPU_ISA values other than "native"
_int, _float, _ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    # q, k_new, v_new, k_cache, v_cache, block_tables, lengths, out, rows, heads, kv_heads, dim, block_size,
    # max_blocks, window, scale, softcap (0: none), sinks (fp32 [heads], or None), cache_bits, threads
    "decode_attention_f32": [_ptr] * 8 + [_int] * 7 + [_float, _float, _ptr, _int, _int],
    "decode_attention_fp16_cache": [],
    "decode_attention_partials_bytes": [],
    # x, w, bias (or None), y, rows, in, out, threads
    "linear_f32": [_ptr, _ptr, _ptr, _ptr, _int, _int, _int, _int],
    "linear_bf16": [_ptr, _ptr, _ptr, _ptr, _int, _int, _int, _int],
    # x, weight, out, rows, dim, eps, threads
    "rms_norm_f32": [_ptr, _ptr, _ptr, ctypes.c_int64, _int, _float, _int],
    # gate_up, out, rows, inter, threads
    "silu_mul_f32": [_ptr, _ptr, ctypes.c_int64, _int, _int],
    "gelu_tanh_mul_f32": [_ptr, _ptr, ctypes.c_int64, _int, _int],
    # x, cos, sin, tokens, heads, dim, token_stride, head_stride, threads
    "rope_f32": [_ptr, _ptr, _ptr, ctypes.c_int64, _int, _int, ctypes.c_int64, ctypes.c_int64, _int],
    # x, layer_rows, layers, cos, sin, cos_local, sin_local, block_tables, lengths, rows, hidden, heads,
    # kv_heads, head_dim, inter, block_size, max_blocks, eps, scale, softcap, cache_bits, threads, then the skip
    # rule (or None): max_skips, thresholds, first_hot, last_hot, skipped; then the rows' LoRA slots (or None)
    "decode_layers": [_ptr, _ptr, _int] + [_ptr] * 6 + [_int] * 8 + [_float, _float, _float, _int, _int]
    + [_ptr, _ptr, _int, _int, _ptr, _ptr],
    # x, layer_row, cos, sin, cos_local, sin_local, block_tables, lengths, out, rows, hidden, heads, kv_heads,
    # head_dim, block_size, max_blocks, eps, scale, softcap, cache_bits, threads
    "layer_attention_branch": [_ptr] * 9 + [_int] * 7 + [_float, _float, _float, _int, _int],
    # h, layer_row, out, rows, hidden, inter, eps, threads
    "layer_ffn_branch": [_ptr, _ptr, _ptr, _int, _int, _int, _float, _int],
    "linear_f32_vectorized": [],
    "linear_bf16_vectorized": [],
    "quant_cpu_isa": [],
    # q, dst, out, groups, group, bits, threads
    "quant_tile_integers": [_ptr, _ptr, _int, _int, _int, _int, _int],
}
# per built instruction set (ISA_VARIANTS), with the suffix `_<isa>`:
# x, q, scale, offset (or None), table (or None), bias (or None), y, rows, in, out, bits, group, scale_bits, threads
VARIANT_SIGNATURES = {"quant_linear": [_ptr] * 7 + [_int] * 7}
RESTYPES = {"linear_f32_vectorized": ctypes.c_int, "linear_bf16_vectorized": ctypes.c_int, "quant_cpu_isa": ctypes.c_int,
            "quant_linear": ctypes.c_int, "decode_attention_fp16_cache": ctypes.c_int,
            "decode_attention_partials_bytes": ctypes.c_int64}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_disabled = False
_libraries: dict[str, ctypes.CDLL] = {}


def emulated_isa() -> str | None:
    """"avx2" when SKIPSERVE_CPU_ISA=avx2 asks this process to run as an AVX2-only host would."""
    isa = os.environ.get("SKIPSERVE_CPU_ISA", "native")
    if isa != "native" and isa not in EMULATED:
        raise ValueError(f"SKIPSERVE_CPU_ISA={isa!r}: expected one of {sorted(('native',) + EMULATED)}")
    return None if isa == "native" else isa


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
        isa = emulated_isa() or "native"
        try:
            _lib = open_library(isa, cache_dir)
        except Exception as exc:  # no compiler, a failed build, an unloadable library: torch paths
            log.warning("native CPU kernels unavailable (%s); using torch kernels", exc)
        return _lib


def open_library(isa: str, cache_dir: str | None = None) -> ctypes.CDLL:
    """The kernels built for `isa` (see ISA_FLAGS), compiled on first use; raises when they cannot be.
    `load` opens the one a process runs on; tests open "avx2" beside it to check that path too."""
    if isa not in _libraries:
        path = _build(native_root(cache_dir), ISA_FLAGS[isa])
        lib = ctypes.CDLL(str(path))
        for name, args in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, RESTYPES.get(name)
        for variant in sorted({v for variants in _isa_variants().values() for v in variants}):
            for name, args in VARIANT_SIGNATURES.items():
                fn = getattr(lib, f"{name}_{variant}")
                fn.argtypes, fn.restype = args, RESTYPES.get(name)
        _libraries[isa] = lib
        log.info("native CPU kernels (%s): %s", isa, path)
    return _libraries[isa]


def native_root(cache_dir: str | None = None) -> Path:
    """Where built libraries are kept: $SKIPSERVE_NATIVE_CACHE, else the model cache's `native/`. Each
    is named by a digest of its sources, flags, compiler and CPU, so one folder serves any number of
    model caches (the tests' servers, each with a cache of its own, build once a session)."""
    return Path(os.environ.get("SKIPSERVE_NATIVE_CACHE") or Path(cache_root(cache_dir)) / "native")


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


def _build(root: Path, isa_flags: list[str]) -> Path:
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    variants = [(HERE / name, isa, flags) for name, isas in _isa_variants().items() for isa, flags in isas.items()]
    texts = [p.read_text() for p in SOURCES + HEADERS] + [f"{p.read_text()}{isa}{flags}" for p, isa, flags in variants]
    for part in [version, " ".join(FLAGS + isa_flags), _cpu_signature()] + texts:
        digest.update(part.encode())
    target = root / f"skipserve_native-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("compiling native CPU kernels -> %s", target)
    compile_flags = [f for f in FLAGS if f != "-shared"]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = Path(tmp) / target.name
        # one object a source (an ISA variant's with its own flags), compiled side by side: the
        # translation units are independent. The variants (the slowest) start first.
        jobs = [([*compile_flags, *flags, f"-DQUANT_ISA={isa}"], source, Path(tmp) / f"{source.stem}_{isa}.o")
                for source, isa, flags in variants]
        jobs += [([*compile_flags, *isa_flags], source, Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        with ThreadPoolExecutor(max_workers=_build_workers()) as pool:
            list(pool.map(lambda job: _run([cxx, *job[0], "-c", str(job[1]), "-o", str(job[2])]), jobs))
        _run([cxx, *FLAGS, *isa_flags, *(str(obj) for _, _, obj in jobs), "-o", str(out)])
        os.replace(out, target)  # atomic: a concurrent start sees all of it or none
    return target


def _build_workers() -> int:
    """Compilers run at once: one a CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1


def _isa_variants() -> dict:
    return ISA_VARIANTS if platform.machine() in ("x86_64", "AMD64") else {}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed: {proc.stderr.strip()[-2000:]}")
