"""The C++ decode attention (engine/native) against the torch path it replaces, on the shapes the
models use: grouped queries, rows on scattered slots of different lengths, sliding windows."""
import pytest
import torch

from engine import native
from engine.attention import AttentionMetadata, _decode
from engine.native import ops


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    lib = native.load(str(tmp_path_factory.mktemp("cache")))
    assert lib is not None, "g++ is on these machines: the kernels must build"
    return lib


def torch_decode(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setattr(ops, "decode_attention_supported", lambda *a: False)
        return _decode(*args)


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 1, 256), (8, 8, 32), (6, 2, 40)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_matches_torch(kernels, monkeypatch, heads, kv_heads, dim, window):
    gen = torch.Generator().manual_seed(heads * dim)
    slots, max_len = 6, 64
    k_cache = torch.randn(slots, kv_heads, max_len, dim, generator=gen)
    v_cache = torch.randn(slots, kv_heads, max_len, dim, generator=gen)
    for slot_ids, positions in [([0], [0]), ([4], [33]), ([3, 0, 5, 1], [12, 0, 63, 7])]:
        rows = len(slot_ids)
        q = torch.randn(rows, heads, dim, generator=gen)
        k = torch.randn(rows, kv_heads, dim, generator=gen)
        v = torch.randn(rows, kv_heads, dim, generator=gen)
        meta = AttentionMetadata.for_decode(slot_ids, positions, "cpu", torch.float32)
        assert ops.decode_attention_supported(q, k_cache)
        kc, vc = k_cache.clone(), v_cache.clone()
        ours = _decode(q, k, v, kc, vc, meta, dim ** -0.5, window)
        ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
        ref = torch_decode(monkeypatch, q, k, v, ref_kc, ref_vc, meta, dim ** -0.5, window)
        assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)  # the new K/V written the same way
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
