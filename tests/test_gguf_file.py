"""engine/gguf_file.py reads what gguf-py's GGUFReader reads (the metadata's scalars and strings,
every tensor's name, type, shape and bytes), for the embedded files and a written one; so does
engine/plain_gguf_reader.py's PlainReader (all of the metadata), which stands in for GGUFReader
where Gemma 3's vocabulary would take it 20 s."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from engine.gguf_file import GGUFFile, is_gguf
from engine.plain_gguf_reader import PlainReader, plain_readers
from engine.loader import embedded_gguf
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(params=["smollm2-135m-instruct", "gemma3-270m", "tiny-qwen2"])
def gguf_path(request, tmp_path):
    if request.param == "tiny-qwen2":  # biases in F32 beside Q8_0 and Q4_1 matrices
        return write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", embedded_gguf("smollm2-135m-instruct"))
    return embedded_gguf(request.param)


def test_the_plain_reader_reads_what_gguf_py_reads_and_is_lent_for_a_block(tmp_path):
    # SmolLM2's tokenizer beside F32, Q8_0 and Q4_1 tensors
    path = write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", embedded_gguf("smollm2-135m-instruct"))
    plain, theirs = PlainReader(str(path)), GGUFReader(str(path))
    assert type(plain.data) is np.ndarray and not plain.data.flags.writeable
    assert plain.fields.keys() == theirs.fields.keys() and len(plain.fields["tokenizer.ggml.tokens"].data) > 1000
    for key, field in theirs.fields.items():
        mine = plain.fields[key]
        assert (mine.offset, mine.types, mine.data) == (field.offset, field.types, field.data), key
        assert [(p.dtype, p.tobytes()) for p in mine.parts] == [(p.dtype, p.tobytes()) for p in field.parts], key
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in plain.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(plain.tensors, theirs.tensors))
    import gguf

    with plain_readers():
        assert gguf.GGUFReader is PlainReader
    assert gguf.GGUFReader is GGUFReader


def test_gguf_file_reads_what_gguf_py_reads(gguf_path):
    ours, theirs = GGUFFile(gguf_path), PlainReader(str(gguf_path))
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


def test_a_truncated_file_is_named_as_such(tmp_path):
    whole = write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", embedded_gguf("smollm2-135m-instruct")).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:1000])  # inside the metadata
    with pytest.raises(ValueError, match="header ends early"):
        GGUFFile(cut)
    cut.write_bytes(whole[:len(whole) - 100])  # inside the last tensor's data
    with pytest.raises(ValueError, match="past the end of the file"):
        GGUFFile(cut)


def test_a_gguf_is_known_by_its_first_bytes_whatever_its_name(tmp_path):
    from engine.loader import ModelNotFoundError, resolve_model_path

    renamed = tmp_path / "model.bin"
    renamed.write_bytes(embedded_gguf("smollm2-135m-instruct").read_bytes()[:4096])
    assert is_gguf(renamed) and resolve_model_path(str(renamed)) == renamed
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="neither a GGUF file"):
        resolve_model_path(str(tmp_path / "notes.txt"))


def test_a_files_digest_is_kept_for_the_next_start(tmp_path, monkeypatch):
    """A GGUF is hashed once per version (size, modification time, inode): a later start reads
    the digest from the cache; a changed file is hashed again, and names another folder."""
    import os

    import engine.loader as loader

    source = write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", embedded_gguf("smollm2-135m-instruct"))
    hashed = []
    real = loader.file_sha256
    monkeypatch.setattr(loader, "file_sha256", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(loader, "write_metadata", lambda gguf, target: target.mkdir(parents=True) or
                        (target / "config.json").write_text("{}"))
    cache = str(tmp_path / "cache")
    first = loader.ensure_hf_dir(str(source), cache, dense=False)
    loader._file_digest.cache_clear()  # as a new process
    assert loader.ensure_hf_dir(str(source), cache, dense=False) == first and len(hashed) == 1
    assert first.name.startswith("qwen2-") and real(source)[:16] in first.name
    with open(source, "r+b") as f:  # the same size, other bytes, a later time
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(source, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns + 10**9))
    loader._file_digest.cache_clear()
    assert loader.ensure_hf_dir(str(source), cache, dense=False) != first and len(hashed) == 2
