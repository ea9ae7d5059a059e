"""The C++ kernels (engine/native) against the torch paths they replace, on the shapes the models
use: paged decode attention with grouped queries, rows on scattered blocks of different lengths and
sliding windows; the GEMMs, norms, activation and rotary."""
import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.backends.torch_backend import TorchBackend
from engine.kv import int8_rows
from engine.kv.metadata import AttentionMetadata
from engine.native import ops


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    lib = native.load(str(tmp_path_factory.mktemp("cache")))
    assert lib is not None, "g++ is on these machines: the kernels must build"
    return lib


def reference_attention(q, k_cache, v_cache, table, length, scale, window, softcap=None, sinks=None):
    """One row, written out: its keys and values read position by position through the table;
    scores soft-capped as Gemma 2 writes it, cap * tanh(s / cap); each head's sink a logit of the
    softmax whose probability is dropped, as gpt-oss's reference writes it."""
    block_size = k_cache.shape[2]
    start = max(0, length - window) if window else 0
    positions = torch.arange(start, length)
    blocks = torch.as_tensor(table)[positions // block_size]
    keys = k_cache[blocks, :, positions % block_size].transpose(0, 1)  # [KV, span, D]
    values = v_cache[blocks, :, positions % block_size].transpose(0, 1)
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [H, span, D]
    scores = torch.einsum("hd,htd->ht", q, keys) * scale
    scores = softcap * torch.tanh(scores / softcap) if softcap else scores
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None]], dim=-1)
    probs = scores.softmax(-1)[:, :values.shape[1]]
    return torch.einsum("ht,htd->hd", probs, values).reshape(-1)


def cache_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values as a cache of `dtype` holds them (int8: rows with their scales)."""
    return int8_rows.quantize(x) if dtype == torch.int8 else x.to(dtype)


def cache_values(rows: torch.Tensor) -> torch.Tensor:
    """What a cache's rows hold, in fp32."""
    return int8_rows.dequantize(rows) if rows.dtype == torch.int8 else rows.float()


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 2, 128), (4, 1, 256), (8, 8, 32), (6, 2, 40)])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window, softcap, with_sinks", [(None, None, False), (7, None, False), (None, 1.5, False),
                                                        (7, 1.5, False), (None, None, True), (7, None, True)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_paged_decode_attention_matches_torch(kernels, heads, kv_heads, dim, block_size, window, softcap, with_sinks,
                                              cache_dtype):
    """Rows whose blocks are scattered through the cache, out of order, of lengths that end anywhere
    in a block; the kernel writes each row's new K/V through its table, and so does the torch path
    (an fp16 cache: both round the new K/V to nearest even, and both attend over the same fp16
    values, widened exactly to fp32). Sinks (gpt-oss) about as large as the scores."""
    if cache_dtype not in ops.cache_dtypes():
        pytest.skip("this build reads fp16 caches only with F16C")
    gen = torch.Generator().manual_seed(heads * dim + block_size)
    num_blocks = 40
    k_cache = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen).to(cache_dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [order[0:1], order[1:9], order[9:12], order[12:20]]
    sinks = torch.randn(heads, generator=gen) * 2 if with_sinks else None
    for rows, positions in [([0], [0]), ([1], [33]), ([2, 0, 3, 1], [12, 0, 8 * block_size - 1, 7])]:
        row_tables = [tables[r] for r in rows]
        q = torch.randn(len(rows), heads, dim, generator=gen)
        k = torch.randn(len(rows), kv_heads, dim, generator=gen)
        v = torch.randn(len(rows), kv_heads, dim, generator=gen)
        meta = AttentionMetadata.for_decode(row_tables, positions, block_size, "cpu", torch.float32)
        assert ops.decode_attention_supported(q, k_cache)
        kc, vc = k_cache.clone(), v_cache.clone()
        ours = ops.decode_attention(q, k, v, kc, vc, meta.block_tables, meta.context_lens, meta.max_context_len,
                                    dim ** -0.5, window, softcap, sinks)
        ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
        ref = TorchBackend().attention(q, k, v, ref_kc, ref_vc, meta, dim ** -0.5, window, softcap, sinks)
        assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)  # the kernel writes the new K/V itself
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        for i, (table, pos) in enumerate(zip(row_tables, positions)):
            expected = reference_attention(q[i], kc.float(), vc.float(), table, pos + 1, dim ** -0.5, window, softcap,
                                           sinks)
            torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-5)
        if sinks is not None:  # the sinks bind: without them the output differs
            assert (ours - ops.decode_attention(q, k, v, kc.clone(), vc.clone(), meta.block_tables, meta.context_lens,
                                                meta.max_context_len, dim ** -0.5, window, softcap)).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("cap, with_sinks", [(1.5, False), (None, True), (1.5, True)])
def test_capped_or_sunk_prefill_whole_and_in_chunks_matches_the_written_out_attention(window, cap, with_sinks):
    """Gemma 2's capped scores and gpt-oss's sinks on the prefill path (SDPA takes neither): a whole
    prompt, and the same prompt in two chunks of which the second reads the first's K/V from its
    blocks, give every token the attention the row-by-row reference gives it."""
    gen = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, dim, block = 29, 6, 2, 32, 8
    sinks = torch.randn(heads, generator=gen) * 2 if with_sinks else None
    q, k, v = (torch.randn(tokens, h, dim, generator=gen) * 2 for h in (heads, kv_heads, kv_heads))
    table = [5, 2, 7, 0]
    outs = []
    for chunks in ([(0, tokens)], [(0, 11), (11, tokens - 11)]):
        k_cache, v_cache = (torch.zeros(8, kv_heads, block, dim) for _ in range(2))
        out = []
        for start, n in chunks:
            meta = AttentionMetadata.for_prefill([(table, start, n)], block, "cpu")
            out.append(TorchBackend().attention(q[start:start + n], k[start:start + n], v[start:start + n], k_cache,
                                                v_cache, meta, dim ** -0.5, window, cap, sinks))
        outs.append(torch.cat(out))
    for p in range(tokens):
        expected = reference_attention(q[p], k_cache, v_cache, table, p + 1, dim ** -0.5, window, cap, sinks)
        for out in outs:
            torch.testing.assert_close(out[p], expected, rtol=1e-5, atol=1e-5)
    plain = reference_attention(q[-1], k_cache, v_cache, table, tokens, dim ** -0.5, window)
    assert (plain - outs[0][-1]).abs().max() > 1e-2  # the cap and sinks bind: the checks above have teeth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features", [(48, 64), (16, 576), (960, 576), (32, 34), (48, 35), (8, 64), (60, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", ["native", "onednn"])
def test_linear_matches_torch(kernels, dtype, out_features, in_features, with_bias, backend):
    """Every row count the kernels tile differently (1-2 rows: single blocks; more: pairs of blocks
    in tiles of 6 rows), an odd number of blocks, outputs that end inside a block (a router of 8 or 60
    experts: zero rows pad the block), with and without bias; and the oneDNN backend
    used where the kernels are not available. fp32 against F.linear;
    bf16 against F.linear on the input rounded to bf16, summed in fp32."""
    from engine.backends.cpu.linear import Linear, onednn_packs

    gen = torch.Generator().manual_seed(out_features + in_features)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    if backend == "native":
        if not ops.linear_supported(torch.zeros(16, 16, dtype=dtype)):
            pytest.skip("no vectorized kernel for this dtype on this CPU (needs AVX-512 or AVX2 + FMA)")
        layer = Linear(weight, bias)  # the default choice
        # bf16 pairs need an even `in`: such a layer falls back to oneDNN (F.linear where oneDNN has
        # no bf16 path), and is still right
        odd_bf16 = dtype == torch.bfloat16 and in_features % 2
        backend = ("onednn" if onednn_packs(dtype) else "plain") if odd_bf16 else "native"
        assert layer.backend == backend
    else:
        if not onednn_packs(dtype):
            pytest.skip(f"oneDNN has no {dtype} path on this CPU (bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
        layer = Linear(weight, bias, backend)
    for rows in (1, 2, 3, 7, 13, 64):
        x = torch.randn(rows, in_features, generator=gen)
        ref = F.linear(x.to(dtype).float(), weight.float(), bias)
        # oneDNN's (and F.linear's) bf16 matmul also hands back bf16: its output carries bf16 rounding
        tol = 1e-2 if backend in ("onednn", "plain") and dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(layer(x), ref, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def avx2_kernels(kernels, tmp_path_factory):
    """The library an AVX2-only host builds (-march=x86-64-v3), beside this host's own."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX2 build is for x86-64 hosts")
    cpu = open("/proc/cpuinfo").read()
    if not all(f" {flag}" in cpu for flag in ("avx2", "fma", "f16c")):
        pytest.skip("this CPU cannot run the AVX2 + FMA build")
    return native.build.open_library("avx2", str(tmp_path_factory.mktemp("avx2-cache")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features", [(48, 64), (960, 576), (32, 34), (48, 35)])
def test_avx2_linear_matches_torch(kernels, avx2_kernels, dtype, out_features, in_features):
    """The AVX2 + FMA GEMMs, which an AVX2-only host picks, on every row tiling (tiles of 3 rows):
    fp32 sums in the AVX-512 kernel's order, so where this host runs that kernel the bits agree;
    bf16 products are exact in fp32, so only summation rounding separates it from the reference."""
    if dtype == torch.bfloat16 and in_features % 2:
        pytest.skip("bf16 pairs need an even number of inputs (such layers use another backend)")
    assert avx2_kernels.linear_f32_vectorized() and avx2_kernels.linear_bf16_vectorized()
    gen = torch.Generator().manual_seed(out_features * in_features)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(out_features, generator=gen)
    blocked = ops.block_weight(weight)
    kernel = getattr(avx2_kernels, ops._LINEAR[dtype])
    for rows in (1, 2, 3, 4, 7, 64):
        x = torch.randn(rows, in_features, generator=gen)
        ours = ops.linear(x, blocked, bias, kernel)
        ref = F.linear(x.to(dtype).float(), weight.float(), bias)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        if dtype == torch.float32 and kernels.linear_f32_vectorized():
            assert torch.equal(ours, ops.linear(x, blocked, bias, kernels.linear_f32))


@pytest.fixture(scope="module")
def avx512_kernels(kernels, tmp_path_factory):
    """The library an AVX-512 host without AVX512-BF16 builds (-march=x86-64-v4), beside this host's."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX-512 build is for x86-64 hosts")
    cpu = open("/proc/cpuinfo").read()
    missing = [flag for flag in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd") if f" {flag}" not in cpu]
    if missing:
        pytest.skip(f"this CPU cannot run the x86-64-v4 build (no {', '.join(missing)})")
    return native.build.open_library("avx512", str(tmp_path_factory.mktemp("avx512-cache")))


@pytest.mark.parametrize("out_features, in_features", [(48, 64), (960, 576), (32, 34), (80, 96)])
def test_avx512_bf16_linear_matches_avx2(kernels, avx2_kernels, avx512_kernels, out_features, in_features):
    """bf16 weights on AVX-512 without AVX512-BF16 (each pair widened in 16-lane registers, pairs of
    blocks in tiles of 6 rows) against the reference, and bit for bit against the AVX2 build (8
    lanes, single blocks in tiles of 3 rows): per output the same fp32 operations in the same order.
    Every tiling: 1-2 rows (single blocks), odd block counts (a pair, then one), partial row tiles,
    an odd number of input pairs (the chains' tail)."""
    assert avx512_kernels.linear_bf16_vectorized()
    gen = torch.Generator().manual_seed(out_features + 7 * in_features)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen)
    blocked = ops.block_weight(weight)
    for rows in (1, 2, 3, 5, 7, 13, 64):
        x = torch.randn(rows, in_features, generator=gen)
        ours = ops.linear(x, blocked, bias, avx512_kernels.linear_bf16)
        ref = F.linear(x.to(torch.bfloat16).float(), weight.float(), bias)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(ours, ops.linear(x, blocked, bias, avx2_kernels.linear_bf16))


@pytest.fixture(scope="module")
def cpu_ops(kernels):
    from engine.backends.cpu import CPUBackend

    ops_ = CPUBackend()
    assert ops_.native
    return ops_


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (3, 4, 256), (300, 640)])
def test_rms_norm_matches_torch(cpu_ops, shape):
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen) * 3
    weight = torch.randn(shape[-1], generator=gen)
    ours = cpu_ops.rms_norm(x, weight, 1e-5)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight  # HF's formula
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 16, 200])
def test_silu_mul_matches_torch(cpu_ops, rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536, generator=gen) * 8  # tails well past exp's clamps
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(cpu_ops.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, inter", [(1, 2048), (16, 2048), (3, 1029)])
def test_gelu_tanh_mul_matches_torch(cpu_ops, rows, inter):
    """Gemma's activation, as x / (1 + exp(-2u)): tails past the exp's clamps and a width that is
    not a multiple of the 8 lanes."""
    gen = torch.Generator().manual_seed(rows + inter)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 8
    gate_up[0, :6] = torch.tensor([-1e4, -60.0, -9.5, 0.0, 9.5, 1e4])
    gate, up = gate_up.chunk(2, -1)
    ours = cpu_ops.gelu_tanh_mul(gate_up)
    torch.testing.assert_close(ours, F.gelu(gate, approximate="tanh") * up, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("heads, dim, turned", [(9 + 3, 64, 64), (4, 256, 256), (6, 32, 24), (3, 128, 96)])
def test_rope_in_place_matches_torch(cpu_ops, heads, dim, turned):
    """On a q|k view of a wider qkv row, as the models call it; positions anywhere in the table;
    tables narrower than a head (Phi-4-mini's) turn its leading dimensions, the torch path's too."""
    from engine.backends.torch_backend import TorchBackend
    from engine.models.rope import RotaryEmbedding

    gen = torch.Generator().manual_seed(dim)
    rope = RotaryEmbedding(turned, 10000.0, None, 512, "cpu", torch.float32)
    cos, sin = rope(torch.tensor([0, 5, 511, 77]))
    qkv = torch.randn(4, (heads + 2) * dim, generator=gen)
    x = qkv[:, :heads * dim].view(4, heads, dim)
    half, lead = turned // 2, x[..., :turned]
    ref = torch.cat([lead * cos + torch.cat([-lead[..., half:], lead[..., :half]], dim=-1) * sin,  # HF's rotate_half
                     x[..., turned:]], dim=-1)
    tail = qkv[:, heads * dim:].clone()
    torch.testing.assert_close(TorchBackend().rotary(x, cos, sin), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cpu_ops.rotary(x, cos, sin), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, heads * dim:], tail)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_is_batch_invariant(kernels, dtype):
    """A row's output is bit-identical alone and in a batch of any size: the kernels sum every
    output in the same order however the rows are tiled."""
    from engine.backends.cpu.linear import Linear

    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(960, 576, generator=gen) * 0.05).to(dtype)
    if not ops.linear_supported(weight):
        pytest.skip("no vectorized kernel for this dtype on this CPU")
    layer = Linear(weight, torch.randn(960, generator=gen), backend="native")
    x = torch.randn(16, 576, generator=gen)
    full = layer(x)
    for rows in (1, 2, 3, 5, 6, 7, 12, 13):
        assert torch.equal(layer(x[:rows]), full[:rows])
    for i in range(16):
        assert torch.equal(layer(x[i:i + 1]), full[i:i + 1])


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 1, 256), (8, 2, 128), (6, 2, 32)])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window, softcap, with_sinks", [(None, None, False), (300, None, True), (None, 1.5, False)])
def test_long_rows_are_attended_in_parts_and_merged(request, isa, cache_dtype, heads, kv_heads, dim, block_size, window,
                                                    softcap, with_sinks):
    """Rows longer than a work item's part (256 positions) are attended in parts, on whichever thread
    is free, and the parts merged: each row against the written-out reference (int8 rows: over the
    values they hold), each row alone bit for bit as in the batch, and one thread bit for bit as
    two. The new K/V go into the cache as the torch path writes them (int8: int8_rows.quantize)."""
    lib = request.getfixturevalue("kernels" if isa == "native" else "avx2_kernels")
    if cache_dtype == torch.float16 and not lib.decode_attention_fp16_cache():
        pytest.skip("this build reads fp16 caches only with F16C")
    gen = torch.Generator().manual_seed(dim * block_size + heads)
    lengths = [700, 257, 1, 515]  # 3, 2, 1 and 3 parts (a window of 300: 2 parts)
    counts = [-(-n // block_size) for n in lengths]
    num_blocks = sum(counts) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [order[sum(counts[:i]):sum(counts[:i + 1])] for i in range(len(lengths))]
    k_cache = cache_rows(torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen), cache_dtype)
    v_cache = cache_rows(torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen), cache_dtype)
    q = torch.randn(len(lengths), heads, dim, generator=gen) * 2  # peaked softmaxes: parts differ in their max
    k = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    v = torch.randn(len(lengths), kv_heads, dim, generator=gen)
    sinks = torch.randn(heads, generator=gen) * 2 if with_sinks else None
    scale = dim ** -0.5

    def attend(rows, threads=None):
        meta = AttentionMetadata.for_decode([tables[r] for r in rows], [lengths[r] - 1 for r in rows], block_size,
                                            "cpu", torch.float32)
        kc, vc = k_cache.clone(), v_cache.clone()
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            out = ops.decode_attention(q[rows], k[rows], v[rows], kc, vc, meta.block_tables, meta.context_lens,
                                       meta.max_context_len, scale, window, softcap, sinks, lib=lib)
        finally:
            torch.set_num_threads(before)
        return out, kc, vc

    rows = list(range(len(lengths)))
    ours, kc, vc = attend(rows)
    for i, (table, length) in enumerate(zip(tables, lengths)):
        at = table[(length - 1) // block_size], (length - 1) % block_size
        assert torch.equal(kc[at[0], :, at[1]], cache_rows(k[i], cache_dtype))
        assert torch.equal(vc[at[0], :, at[1]], cache_rows(v[i], cache_dtype))
        expected = reference_attention(q[i], cache_values(kc), cache_values(vc), table, length, scale, window, softcap,
                                       sinks)
        torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(attend([i])[0][0], ours[i])
    assert torch.equal(attend(rows, threads=1)[0], ours)


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("heads, kv_heads, dim, block_size, window",
                         [(9, 3, 64, 16, None), (4, 1, 256, 5, None), (8, 2, 128, 16, 530)])
def test_a_prompts_rows_share_their_whole_parts_and_keep_their_bits(request, isa, cache_dtype, heads, kv_heads, dim,
                                                                    block_size, window):
    """Rows of one sequence at consecutive positions (a prompt prefilled as rows) share the work
    items of their whole parts, up to 8 rows an item; rows of another sequence of the same lengths
    right after them do not (their blocks differ), nor do rows a window cuts (530: the last rows).
    Each row against the written-out reference, and bit for bit as alone."""
    lib = request.getfixturevalue("kernels" if isa == "native" else "avx2_kernels")
    if cache_dtype == torch.float16 and not lib.decode_attention_fp16_cache():
        pytest.skip("this build reads fp16 caches only with F16C")
    gen = torch.Generator().manual_seed(dim + block_size)
    lengths = list(range(521, 541)) * 2  # 3 parts each: two whole ones to share, then its own
    per_sequence = -(-540 // block_size)
    order = torch.randperm(2 * per_sequence + 3, generator=gen).tolist()
    tables = [order[:per_sequence]] * 20 + [order[per_sequence:2 * per_sequence]] * 20
    k_cache = cache_rows(torch.randn(len(order), kv_heads, block_size, dim, generator=gen), cache_dtype)
    v_cache = cache_rows(torch.randn(len(order), kv_heads, block_size, dim, generator=gen), cache_dtype)
    q = torch.randn(40, heads, dim, generator=gen) * 2
    k, v = torch.randn(40, kv_heads, dim, generator=gen), torch.randn(40, kv_heads, dim, generator=gen)
    scale = dim ** -0.5

    def attend(rows):
        meta = AttentionMetadata.for_decode([tables[r] for r in rows], [lengths[r] - 1 for r in rows], block_size,
                                            "cpu", torch.float32)
        return ops.decode_attention(q[rows], k[rows], v[rows], k_cache, v_cache, meta.block_tables, meta.context_lens,
                                    meta.max_context_len, scale, window, None, None, lib=lib)

    ours = attend(list(range(40)))  # the caches now hold every row's K/V, which a row alone writes again
    for i in range(40):
        expected = reference_attention(q[i], cache_values(k_cache), cache_values(v_cache), tables[i], lengths[i], scale,
                                       window, None, None)
        torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(attend([i])[0], ours[i])


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_rows_whose_parts_outgrow_a_run_go_in_runs_and_keep_their_bits(request, isa):
    """A call's rows go in runs whose split parts' records stay within the kernel's bound (8 MB):
    64 rows of a 4,100-token prompt with 32 heads of 128 (17 parts each) span several runs, and
    each row has the bits it has alone, against the written-out reference."""
    lib = request.getfixturevalue("kernels" if isa == "native" else "avx2_kernels")
    heads, kv_heads, dim, block_size = 32, 4, 128, 16
    lengths = list(range(4037, 4101))
    per_row = lambda n: -(-n // 256)  # noqa: E731  parts: the kernel's PART
    run_parts = lib.decode_attention_partials_bytes() // (4 * heads * (dim + 2))
    assert sum(per_row(n) for n in lengths) > 2 * run_parts  # three runs at least
    gen = torch.Generator().manual_seed(5)
    table = torch.randperm(-(-4100 // block_size) + 2, generator=gen).tolist()
    k_cache = torch.randn(len(table), kv_heads, block_size, dim, generator=gen)
    v_cache = torch.randn(len(table), kv_heads, block_size, dim, generator=gen)
    q = torch.randn(len(lengths), heads, dim, generator=gen) * 2
    k, v = (torch.randn(len(lengths), kv_heads, dim, generator=gen) for _ in range(2))
    scale = dim ** -0.5

    def attend(rows):
        meta = AttentionMetadata.for_decode([table] * len(rows), [lengths[r] - 1 for r in rows], block_size, "cpu",
                                            torch.float32)
        return ops.decode_attention(q[rows], k[rows], v[rows], k_cache, v_cache, meta.block_tables, meta.context_lens,
                                    meta.max_context_len, scale, None, None, None, lib=lib)

    ours = attend(list(range(len(lengths))))
    for i in (0, 17, 30, 31, 45, 63):
        expected = reference_attention(q[i], k_cache, v_cache, table, lengths[i], scale, None, None, None)
        torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(attend([i])[0], ours[i])


def test_int8_rows_hold_each_group_to_half_a_step(kernels):
    """A row's values come back within half a quantization step of their group (absmax / 127 / 2);
    an all-zero group holds zeros."""
    x = torch.randn(5, 3, 128) * torch.logspace(-3, 3, 128)  # groups of very different sizes
    x[0, 0, 32:64] = 0
    rows = int8_rows.quantize(x)
    assert rows.shape == (5, 3, int8_rows.row_bytes(128)) and rows.dtype == torch.int8
    back = int8_rows.dequantize(rows)
    step = x.view(5, 3, 4, 32).abs().amax(-1, keepdim=True) / 127
    assert ((back - x).view(5, 3, 4, 32).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[0, 0, 32:64], torch.zeros(32))


def test_decode_attention_refuses_a_length_past_the_block_table(kernels):
    q, k = torch.zeros(1, 2, 16), torch.zeros(1, 1, 16)
    cache = torch.zeros(3, 1, 8, 16)
    table = torch.tensor([[2]], dtype=torch.int32)  # one block of 8 tokens
    with pytest.raises(ValueError, match="exceeds the block table"):
        ops.decode_attention(q, k, k, cache, cache.clone(), table, torch.tensor([9], dtype=torch.int32), 9, 0.25,
                             None)
