"""A GGUF file's header, read directly: its scalar metadata and its tensors as numpy views of a
memory map, laid out as gguf-py's `GGUFReader` gives them (quantized tensors as uint8 [rows,
bytes a row], others in their dtype, shape reversed from the file's innermost-first dimensions).

`GGUFReader` turns every metadata array element into numpy objects: a 262k-token vocabulary took
12.9 s to open (Gemma 3), 2.9 s for SmolLM2's 49k, at every start. Here arrays are stepped over
(metadata arrays are the tokenizer's, which transformers reads once into the cache folder), and
opening either file takes a fraction of a second.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.config import positive_int

MAGIC = b"GGUF"
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
KNOWN_TYPES = {t.value for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # innermost first, as the file lists them
    data: np.ndarray  # a view of the file


def is_gguf(path: Path) -> bool:
    """A file that starts as GGUF files do, whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class GGUFFile:
    def __init__(self, path: str | Path):
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise ValueError(f"{path} is not a GGUF file")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._read(path)
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as exc:
            raise ValueError(f"{path}: the GGUF header ends early or is damaged (a truncated file?): {exc}") from None

    def _read(self, path) -> None:
        self._at = 4
        version, tensor_count, kv_count = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            raise ValueError(f"{path}: " + ("a big-endian GGUF (this reader takes little-endian files)" if swapped in (2, 3)
                                            else f"GGUF version {version} (versions 2 and 3 are read)"))
        self.fields: dict[str, object] = {}  # scalar and string metadata (arrays are stepped over)
        self.array_keys: set[str] = set()  # the keys of those arrays
        for _ in range(kv_count):
            key = self._string()
            value = self._value(self._unpack("<I"))
            if value is not None:
                self.fields[key] = value
            else:
                self.array_keys.add(key)
        if int(self.fields.get("split.count", 1)) > 1:
            raise ValueError(f"{path} is part {int(self.fields.get('split.no', 0)) + 1} of a model split into "
                             f"{self.fields['split.count']} files: merge them into one first "
                             "(llama.cpp's `llama-gguf-split --merge FIRST-PART OUT.gguf`)")
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            n_dims = self._unpack("<I")
            if n_dims > MAX_DIMS:
                raise ValueError(f"{path}: tensor {name} has {n_dims} dimensions (at most {MAX_DIMS}): the file is damaged")
            dims = tuple(self._unpack("<Q") for _ in range(n_dims))
            kind = self._unpack("<I")
            if kind not in KNOWN_TYPES:
                raise ValueError(f"{path}: tensor {name} has type {kind}, which this reader does not know "
                                 "(a newer or removed llama.cpp format, or a damaged file)")
            infos.append((name, dims, GGMLQuantizationType(kind), self._unpack("<Q")))
        alignment = self.fields.get("general.alignment", 32)
        if not positive_int(alignment):
            raise ValueError(f"{path}: general.alignment is {alignment!r}, not a positive integer")
        start = -(-self._at // alignment) * alignment
        whole = np.frombuffer(self._map, dtype=np.uint8)
        for name, dims, kind, offset in infos:
            end = start + offset + _nbytes(dims, kind)
            if end > len(whole):
                raise ValueError(f"{path}: tensor {name} ends at byte {end}, past the end of the file ({len(whole)} "
                                 "bytes): the file is truncated")
        self.tensors = [GGUFTensor(name, kind, dims, _view(whole, start + offset, dims, kind))
                        for name, dims, kind, offset in infos]

    def _bytes(self, n: int) -> bytes:
        self._skip(n)
        return self._map[self._at - n:self._at]

    def _skip(self, n: int) -> None:
        self._room(n, f"a length of {n} bytes")
        self._at += n

    def _room(self, n: int, what: str) -> None:
        """`n` more bytes must be in the file (a damaged length would have a slice copy the rest of a
        many-GB file, or a loop step through it)."""
        if n > len(self._map) - self._at:
            raise IndexError(f"{what} at byte {self._at}, past the end of the file")

    def _unpack(self, fmt: str):
        value, = struct.unpack_from(fmt, self._map, self._at)
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return self._bytes(self._unpack("<Q")).decode("utf-8", errors="replace")

    def _value(self, kind: int):
        if kind in SCALARS:
            return self._unpack(SCALARS[kind])
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, count = self._unpack("<I"), self._unpack("<Q")
            if item in SCALARS:
                self._skip(count * struct.calcsize(SCALARS[item]))
            else:
                self._room(count * 8, f"an array of {count} items")  # each item at least a length or a count
                for _ in range(count):
                    self._value(item)
            return None
        raise ValueError(f"unknown GGUF metadata type {kind}")


def _nbytes(dims: tuple[int, ...], kind: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[kind]
    return math.prod(dims) // block * size  # Python ints: int64's product of huge dims wraps past the check


def _view(whole: np.ndarray, at: int, dims: tuple[int, ...], kind: GGMLQuantizationType) -> np.ndarray:
    shape = tuple(reversed(dims))
    if kind in DTYPES:
        dtype = np.dtype(DTYPES[kind])
        return whole[at:at + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
    block, size = GGML_QUANT_SIZES[kind]
    row_bytes = dims[0] // block * size  # BF16 too (a block of 1, 2 bytes), as gguf-py gives it: uint8
    rows = int(np.prod(shape[:-1]))
    return whole[at:at + rows * row_bytes].reshape(*shape[:-1], row_bytes)
