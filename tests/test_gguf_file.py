"""engine/gguf_file.py reads what gguf-py's GGUFReader reads (the metadata's scalars and strings,
every tensor's name, type, shape and bytes), for the embedded files and a written one."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from engine.gguf_file import GGUFFile
from engine.loader import embedded_gguf
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(params=["smollm2-135m-instruct", "gemma3-270m", "tiny-qwen2"])
def gguf_path(request, tmp_path):
    if request.param == "tiny-qwen2":  # biases in F32 beside Q8_0 and Q4_1 matrices
        return write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", embedded_gguf("smollm2-135m-instruct"))
    return embedded_gguf(request.param)


def test_gguf_file_reads_what_gguf_py_reads(gguf_path):
    ours, theirs = GGUFFile(gguf_path), GGUFReader(str(gguf_path))
    scalars = {key: field.contents() for key, field in theirs.fields.items()
               if not key.startswith("GGUF.") and field.types[0] != GGUFValueType.ARRAY}
    assert ours.fields == scalars and "general.architecture" in scalars
    assert len(ours.tensors) == len(theirs.tensors) > 0
    kinds = set()
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, mine.shape) == (ref.name, ref.tensor_type, tuple(int(d) for d in ref.shape))
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, mine.name
        assert np.array_equal(mine.data, ref.data), mine.name
        kinds.add(mine.tensor_type.name)
    assert "F32" in kinds and len(kinds) >= 3  # dense and quantized tensors both read


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(path)
