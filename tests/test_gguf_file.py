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


def _patched(tmp_path, at: int, value: bytes) -> object:
    """The embedded GGUF's first 64 KiB (header and metadata) with `value` written at byte `at`."""
    head = bytearray(embedded_gguf("smollm2-135m-instruct").read_bytes()[:1 << 16])
    head[at:at + len(value)] = value
    path = tmp_path / "patched.gguf"
    path.write_bytes(bytes(head))
    return path


@pytest.mark.parametrize("at, value, message", [
    (24, (1 << 62).to_bytes(8, "little"), "a length of 4611686018427387904 bytes at byte 32, past the end"),
    (4, (4).to_bytes(4, "little"), "GGUF version 4 "),
    (4, (3).to_bytes(4, "big"), "a big-endian GGUF"),
])
def test_a_damaged_header_is_named_without_reading_the_rest_of_the_file(tmp_path, at, value, message):
    """A damaged length sliced the map to the file's end (a copy of a 30 GB model) before it failed."""
    with pytest.raises(ValueError, match=message):
        GGUFFile(_patched(tmp_path, at, value))


def test_a_part_of_a_split_model_is_named_as_such(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "m-00001-of-00002.gguf"), "llama")
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="part 1 of a model split into 2 files: merge them"):
        GGUFFile(tmp_path / "m-00001-of-00002.gguf")


@pytest.mark.parametrize("key, value, message", [
    ("llama.attention.head_count", 0, "head_count is 0, not a positive integer"),
    ("llama.block_count", "thirty", "block_count is 'thirty'"),
    ("llama.block_count", 10**9, "block_count is 1000000000 .at most"),
    ("general.architecture", None, "no general.architecture"),
])
def test_sizes_a_model_cannot_have_are_named_before_transformers_reads_them(key, value, message):
    from engine.loader import check_sizes

    fields = {"general.architecture": "llama", "llama.block_count": 30, "llama.attention.head_count": 9,
              "llama.context_length": 8192, key: value}
    with pytest.raises(ValueError, match=message):
        check_sizes(fields, "m.gguf")


def test_a_tensor_whose_shape_is_not_its_configs_is_refused_before_a_kernel_reads_it():
    """A narrow embedding or final norm was served until the first request: a segfault, a double
    free, or garbage read past the norm's end; a block count short of the file's layers dropped them."""
    import torch

    from engine.config import ModelConfig
    from engine.gguf_weights import load_weights
    from engine.loader import ensure_hf_dir
    from engine.weight_check import check_weights

    path = embedded_gguf("smollm2-135m-instruct")
    cfg = ModelConfig.from_hf_dir(ensure_hf_dir(str(path), dense=False))
    weights = load_weights(path)
    check_weights(cfg, weights, path)  # the file as it is
    damaged = [
        ({"model.norm.weight": torch.ones(288)}, "model.norm.weight is .288., its config needs .576."),
        ({"model.embed_tokens.weight": torch.ones(49152, 288)}, "model.embed_tokens.weight is .49152, 288."),
        ({"model.layers.3.self_attn.k_proj.weight": torch.ones(64, 576)}, "k_proj.weight is .64, 576., its config needs .192, 576."),
        ({"model.layers.30.input_layernorm.weight": torch.ones(576)}, "counts 30 layers, but the file has tensors for layer.s. 30"),
    ]
    for change, message in damaged:
        with pytest.raises(ValueError, match=message):
            check_weights(cfg, {**weights, **change}, path)
    without = {k: v for k, v in weights.items() if not k.startswith("model.layers.29.")}
    with pytest.raises(ValueError, match=r"no tensors for layer\(s\) 29"):
        check_weights(cfg, without, path)
    without = {k: v for k, v in weights.items() if k != "model.layers.7.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match="no tensor model.layers.7.mlp.down_proj.weight"):
        check_weights(cfg, without, path)


def test_matrices_the_kernels_do_not_read_are_named_and_refused_past_the_memory_there_is(monkeypatch, caplog):
    """An IQ2_XXS matrix takes 15.5x its file size as fp32: a 2 GB 7B file ~28 GB, which the OOM
    killer ended with no message."""
    from gguf import GGMLQuantizationType

    from engine import gguf_weights
    from engine.gguf_file import GGUFTensor

    def tensor(kind, shape):
        return GGUFTensor("blk.0.ffn_down.weight", GGMLQuantizationType[kind], shape, np.zeros(0, np.uint8))

    iq2, f16 = tensor("IQ2_XXS", (4096, 4096)), tensor("F16", (4096, 1024))
    monkeypatch.setattr(gguf_weights, "available_memory", lambda: 2**30)
    with caplog.at_level("WARNING", logger="skipserve.loader"):
        gguf_weights.check_expansion("m.gguf", [iq2])
    assert "matrices in IQ2_XXS are not read by the quantized kernels" in caplog.text
    caplog.clear()
    gguf_weights.check_expansion("m.gguf", [f16])  # plain formats are no surprise: no warning
    assert "not read" not in caplog.text
    monkeypatch.setattr(gguf_weights, "available_memory", lambda: 2**26)
    with pytest.raises(ValueError, match=r"\(F16, IQ2_XXS\) take 0.08 GiB as fp32, more than the 0.06 GiB available"):
        gguf_weights.check_expansion("m.gguf", [iq2, f16])
