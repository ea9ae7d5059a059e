"""gguf-py's `GGUFReader` over a plain numpy view of its file's map instead of an `np.memmap`.

The reader slices its map twice for every string in a GGUF's metadata (the vocabulary, 49k to
262k tokens, and as many merges), and every slice of an `np.memmap` runs two Python hooks
(`__getitem__`, `__array_finalize__`): most of its time. A plain view of the same map gives the
same bytes, fields and tensors. Opening SmolLM2's file took 1.3-2.1 s instead of 5.2-5.6 s, Gemma
3's 6.0-8.6 s instead of 20-23 s (2 vCPUs of an AMD EPYC). transformers opens a GGUF three times on
a first start (config, tokenizer, dense weights) through `from gguf import GGUFReader`, so
`plain_readers()` lends it this class for a block.
"""
from __future__ import annotations

from contextlib import contextmanager

import gguf
import numpy as np


class PlainReader(gguf.GGUFReader):
    """`GGUFReader`, its `data` (the whole file) kept as a plain ndarray view of the map."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapped: np.ndarray) -> None:  # the reader's `self.data = np.memmap(...)`
        self._plain = mapped.view(np.ndarray)  # read-only as the map is, which it keeps open (its base)


GGUF_READER = gguf.GGUFReader  # gguf-py's own, put back after every block (even overlapping ones)


@contextmanager
def plain_readers():
    """`gguf.GGUFReader` is PlainReader within the block (for transformers' GGUF loading)."""
    gguf.GGUFReader = PlainReader
    try:
        yield
    finally:
        gguf.GGUFReader = GGUF_READER
