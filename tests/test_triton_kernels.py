"""The CUDA backend's Triton kernels against torch references: compiled on a CUDA device, else on
the CPU under Triton's interpreter (tests/kernel_device.py). Random inputs, outputs poisoned with
NaN before each run, odd sizes (head_dim 80, GQA groups 1/3/4/8, context lengths that are not
multiples of the block size, odd row counts). Sizes stay small: the interpreter is slow."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernel_device import DEVICE, INTERPRETED, poisoned

from engine.backends.cuda.decode_attention import paged_decode_attention  # noqa: E402
from engine.backends.cuda.expert_linear import expert_linear  # noqa: E402
from engine.backends.cuda.gated_activation import gelu_tanh_mul, silu_mul  # noqa: E402
from engine.backends.cuda.masked_ffn import MaskedFFN  # noqa: E402
from engine.backends.cuda.masked_linear import Tiles, masked_linear  # noqa: E402
from engine.backends.cuda.masked_moe import MaskedMoE  # noqa: E402
from engine.backends.cuda.rms_norm import add_rms_norm, head_rms_norm, norm_add, rms_norm  # noqa: E402
from engine.backends.cuda.rotary_kv import rotary_and_write_kv  # noqa: E402
from engine.backends.cuda.write_kv import write_kv  # noqa: E402

BLOCK_SIZE = 16
# bf16 outputs are compared with an fp32 reference: a few bf16 ulps of the output's scale
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def randn(*shape, dtype=torch.float32, generator=None):
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def random_tables(rows: int, blocks_per_row: int, num_blocks: int) -> torch.Tensor:
    """Distinct, shuffled blocks per row, as the allocator hands them out after some churn."""
    perm = torch.randperm(num_blocks)[:rows * blocks_per_row]
    return perm.view(rows, blocks_per_row).to(device=DEVICE, dtype=torch.int32)


def gathered(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[blocks, KV, bs, D], [rows, M] -> [rows, KV, M * bs, D] in fp32 (the reference's copy)."""
    got = cache[tables.long()].float()
    rows, m, kv, bs, d = got.shape
    return got.transpose(1, 2).reshape(rows, kv, m * bs, d)


def reference_attention(q, k_cache, v_cache, tables, lens, scale, window, softcap=None, sinks=None):
    rows, heads, dim = q.shape
    num_kv = k_cache.shape[1]
    keys, values = gathered(k_cache, tables), gathered(v_cache, tables)
    scores = torch.matmul(q.float().view(rows, num_kv, heads // num_kv, dim), keys.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(keys.shape[2], device=q.device)[None, :]
    lens = lens.long()[:, None]
    blocked = pos >= lens
    if window:
        blocked |= pos < lens - window
    scores = scores.masked_fill(blocked[:, None, None, :], float("-inf"))
    if sinks is not None:  # one more logit per head, its probability dropped (gpt-oss)
        sunk = sinks.view(1, num_kv, heads // num_kv, 1).expand(rows, -1, -1, 1)
        probs = torch.cat([scores, sunk], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    out = torch.matmul(probs, values).reshape(rows, heads * dim)
    return torch.where(lens > 0, out, 0.0)  # a row with no context (padding) gives zeros


@pytest.mark.parametrize("heads,kv_heads,head_dim,lens,window,splits,dtype,softcap,sinks", [
    (8, 8, 64, [1, 17, 40], None, None, torch.float32, None, False),  # group 1 (MHA), one split
    (9, 3, 80, [33, 5, 0], 7, 3, torch.float32, None, False),  # group 3, head_dim 80, sliding window, padded row
    (8, 2, 128, [70, 16], None, 4, torch.bfloat16, None, False),  # group 4, several splits and tiles per split
    (8, 1, 64, [97, 50, 3], 40, 2, torch.bfloat16, None, False),  # group 8, window cutting through splits
    (8, 2, 256, [45, 9, 0], 16, 2, torch.float32, 0.5, False),  # Gemma 2: capped scores, 256-wide heads, window
    (8, 2, 64, [45, 9, 0, 100], 16, 4, torch.float32, None, True),  # gpt-oss: sinks, a window, a padded row
    (8, 2, 64, [97, 1], None, 2, torch.bfloat16, None, True),  # sinks merged across splits
])
def test_paged_decode_attention_matches_gathered_softmax(heads, kv_heads, head_dim, lens, window, splits, dtype,
                                                         softcap, sinks):
    rows, num_blocks = len(lens), 32
    max_blocks = math.ceil(max(lens) / BLOCK_SIZE)
    k_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=dtype)
    v_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=dtype)
    tables = random_tables(rows, max_blocks, num_blocks)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # q as a strided view of a fused projection: [rows, heads + 2 * kv_heads, D] -> first `heads`
    q = randn(rows, heads + 2 * kv_heads, head_dim, dtype=dtype)[:, :heads]
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = poisoned(rows, heads * head_dim, dtype=dtype)
    scale = head_dim ** -0.5

    sinks = randn(heads, dtype=torch.float32) * 2 if sinks else None

    got = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, window, splits, out=out,
                                 softcap=softcap, sinks=sinks)

    assert got.data_ptr() == out.data_ptr()
    expected = reference_attention(q, k_cache, v_cache, tables, context_lens, scale, window, softcap, sinks)
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])
    if sinks is not None:  # the sinks bind: without them the output differs
        assert (reference_attention(q, k_cache, v_cache, tables, context_lens, scale, window) - expected).abs().max() > 0.05
    if softcap:  # the cap binds here: without it the output differs
        uncapped = reference_attention(q, k_cache, v_cache, tables, context_lens, scale, window)
        assert (uncapped - expected).abs().max() > 0.05
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)  # it only reads the cache


def test_paged_decode_attention_default_splits_cover_long_contexts():
    """The default split count comes from the block tables' span (fixed under a CUDA graph); rows
    much shorter than the span leave most splits empty, and still come out right."""
    rows, heads, kv_heads, head_dim, num_blocks = 2, 4, 2, 64, 80
    lens = [600, 20]
    k_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim)
    v_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim)
    tables = random_tables(rows, math.ceil(max(lens) / BLOCK_SIZE), num_blocks)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = randn(rows, heads, head_dim)
    got = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    torch.testing.assert_close(got, reference_attention(q, k_cache, v_cache, tables, context_lens, 0.125, None),
                               **TOLERANCE[torch.float32])


@pytest.mark.parametrize("head_dim", [64, 80])
def test_write_kv_writes_each_slot_and_nothing_for_padded_rows(head_dim):
    num_blocks, kv_heads, rows = 6, 2, 5
    k_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=torch.bfloat16)
    v_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=torch.bfloat16)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    kv = randn(rows, 3 * kv_heads, head_dim, dtype=torch.bfloat16)  # views of a fused projection
    k, v = kv[:, kv_heads:2 * kv_heads], kv[:, 2 * kv_heads:]
    tables = [[3, 1], [0], [5, 2], [4], [2]]
    positions = [17, 0, 31, 15, 0]
    slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for t, p in zip(tables, positions)]
    slots[4] = -1  # a padded row of a graph bucket

    write_kv(k, v, k_cache, v_cache, torch.tensor(slots, device=DEVICE))

    expect_k, expect_v = k_before.clone(), v_before.clone()
    for row, slot in enumerate(slots[:4]):
        expect_k[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = k[row]
        expect_v[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = v[row]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@pytest.mark.parametrize("hidden,dtype", [(576, torch.float32), (80, torch.bfloat16)])
def test_rms_norm_matches_torch(hidden, dtype):
    x, weight = randn(3, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    got = rms_norm(x, weight, 1e-5, out=poisoned(3, hidden, dtype=dtype))
    expect = F.rms_norm(x.float(), (hidden,), weight.float(), 1e-5)
    torch.testing.assert_close(got.float(), expect, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_returns_the_norm_of_the_sum_and_updates_the_residual_in_place(dtype):
    rows, hidden = 5, 200
    x, residual, weight = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype), randn(hidden)
    summed_expect = x + residual  # rounded to the activations' dtype, as the unfused model does
    normed_expect = F.rms_norm(summed_expect.float(), (hidden,), weight, 1e-6)

    normed, summed = add_rms_norm(x, residual, weight, 1e-6, out=poisoned(rows, hidden, dtype=dtype), summed=residual)

    assert summed.data_ptr() == residual.data_ptr()
    # one rounding of the same fp32 sum; Triton's interpreter rounds to bf16 toward zero, a GPU
    # to nearest: equal within one bf16 ulp
    torch.testing.assert_close(summed.float(), summed_expect.float(), atol=0, rtol=2 ** -7)
    torch.testing.assert_close(normed.float(), normed_expect, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norms_norm_the_branch_before_it_joins_the_residual(dtype):
    """Gemma's post-attention norm (the branch normed, added, and the sum normed for the FFN) and
    post-FFN norm (normed and added, nothing more), with fp32 (1 + w) weights as Gemma holds them;
    a row of zeros (an FFN that did not run) leaves the residual as it was, bit for bit."""
    rows, hidden = 5, 200
    x, residual = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype)
    x[3] = 0
    x_weight, weight = 1 + randn(hidden), 1 + randn(hidden)
    branch = F.rms_norm(x.float(), (hidden,), x_weight, 1e-6).to(dtype)  # rounded as the unfused model's
    summed_expect = residual + branch
    normed_expect = F.rms_norm(summed_expect.float(), (hidden,), weight, 1e-6)

    normed, summed = add_rms_norm(x, residual, weight, 1e-6, out=poisoned(rows, hidden, dtype=dtype),
                                  summed=poisoned(rows, hidden, dtype=dtype), x_weight=x_weight)
    # the branch rounded to the activations' dtype, then the sum: within an ulp of each (the
    # interpreter rounds bf16 toward zero, torch and a GPU to nearest), not the fixed tolerance
    # of whole bf16 kernels (which a sum near zero would pass whatever it held)
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -22
    bound = ulp * (branch.float().abs() + summed_expect.float().abs())

    def assert_sum(got):
        assert ((got.float() - summed_expect.float()).abs() <= bound).all()

    assert_sum(summed)
    torch.testing.assert_close(normed.float(), normed_expect, **TOLERANCE[dtype])

    before = residual.clone()
    added = norm_add(x, x_weight, residual, 1e-6, summed=residual)
    assert added.data_ptr() == residual.data_ptr()
    assert_sum(added)
    assert torch.equal(added[3], before[3])


@pytest.mark.parametrize("head_dim,heads,kv_heads,dtype", [(128, 4, 2, torch.float32), (80, 3, 1, torch.bfloat16)])
def test_head_rms_norm_norms_q_and_k_heads_in_place_inside_the_fused_projection(head_dim, heads, kv_heads, dtype):
    """Qwen3's per-head norms on the q and k heads of a [rows, q|k|v heads, head_dim] projection
    output, each with its weight, in place; v's heads untouched."""
    rows = 3
    qkv = randn(rows, heads + 2 * kv_heads, head_dim, dtype=dtype)
    before = qkv.clone()
    q_weight, k_weight = randn(head_dim, dtype=dtype), randn(head_dim, dtype=dtype)

    head_rms_norm(qkv[:, :heads], q_weight, 1e-6)
    head_rms_norm(qkv[:, heads:heads + kv_heads], k_weight, 1e-6)

    for part, weight in ((slice(0, heads), q_weight), (slice(heads, heads + kv_heads), k_weight)):
        expect = F.rms_norm(before[:, part].float(), (head_dim,), weight.float(), 1e-6)
        torch.testing.assert_close(qkv[:, part].float(), expect, **TOLERANCE[dtype])
    assert torch.equal(qkv[:, heads + kv_heads:], before[:, heads + kv_heads:])


def reference_rotary(x, cos, sin):
    """The leading cos.shape[-1] dimensions of each head rotated (all of them, or Phi-4-mini's
    part), the rest as they are."""
    rotary = cos.shape[-1]
    x = x.float()
    r, rest = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    turned = r * cos[:, None].float() + torch.cat([-r[..., half:], r[..., :half]], dim=-1) * sin[:, None].float()
    return torch.cat([turned, rest], dim=-1)


@pytest.mark.parametrize("head_dim,rotary_dim,heads,kv_heads,dtype", [
    (64, 64, 9, 3, torch.bfloat16), (80, 80, 4, 4, torch.float32), (128, 128, 32, 8, torch.bfloat16),
    (128, 96, 6, 2, torch.bfloat16), (80, 24, 3, 1, torch.float32)])  # partial: Phi-4-mini's 3/4; an odd share
def test_rotary_and_kv_write_rotate_q_in_place_and_put_rotated_k_and_v_in_their_slots(head_dim, rotary_dim, heads,
                                                                                     kv_heads, dtype):
    """One kernel: q rotated in the fused projection, k rotated and v copied into the paged cache
    at each row's slot, nothing written for a padded row (slot -1), nothing else touched. More
    q|k heads than one program's block (32 + 8 > 16) in the third case; only each head's leading
    dimensions rotated in the last two (k's others written as projected)."""
    tokens, num_blocks = 4, 5
    qkv = randn(tokens, heads + 2 * kv_heads, head_dim, dtype=dtype)
    before = qkv.clone()
    k_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=dtype)
    v_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    angles = torch.rand(tokens, rotary_dim // 2, device=DEVICE) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    slots = [3 * BLOCK_SIZE + 5, 0, -1, 4 * BLOCK_SIZE + BLOCK_SIZE - 1]

    rotary_and_write_kv(qkv, cos, sin, k_cache, v_cache, torch.tensor(slots, device=DEVICE), heads, kv_heads)

    torch.testing.assert_close(qkv[:, :heads].float(), reference_rotary(before[:, :heads], cos, sin), **TOLERANCE[dtype])
    assert torch.equal(qkv[:, heads:], before[:, heads:])  # k and v stay as projected
    rotated_k = reference_rotary(before[:, heads:heads + kv_heads], cos, sin)
    expect_k, expect_v = k_before.float(), v_before.float()
    for row, slot in enumerate(slots):
        if slot >= 0:
            expect_k[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = rotated_k[row]
            expect_v[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = before[row, heads + kv_heads:].float()
    torch.testing.assert_close(k_cache.float(), expect_k, **TOLERANCE[dtype])
    assert torch.equal(v_cache.float(), expect_v)


@pytest.mark.parametrize("inter,dtype", [(1536, torch.bfloat16), (100, torch.float32)])
def test_silu_and_gelu_tanh_times_up(inter, dtype):
    gate_up = randn(3, 2 * inter, dtype=dtype) * 3
    gate, up = gate_up.float().chunk(2, -1)
    got = silu_mul(gate_up, out=poisoned(3, inter, dtype=dtype))
    torch.testing.assert_close(got.float(), F.silu(gate) * up, **TOLERANCE[dtype])
    got = gelu_tanh_mul(gate_up, out=poisoned(3, inter, dtype=dtype))
    torch.testing.assert_close(got.float(), F.gelu(gate, approximate="tanh") * up, **TOLERANCE[dtype])


@pytest.mark.parametrize("rows,run,with_residual,n_out,k_in", [
    (1, [1], False, 100, 70),  # neither size a multiple of the tiles
    (5, [1, 0, 1, 1, 0], True, 100, 70),
    (70, [i % 3 != 0 and i < 64 for i in range(70)], True, 100, 70),  # two row tiles; the second runs no row
    (3, [0, 0, 0], True, 100, 70),  # nobody runs: out = residual
    (2, [0, 1], True, 600, 300),  # several output tiles and K steps, also with the interpreter's wide tiles
])
def test_masked_linear_computes_running_rows_and_passes_the_others(rows, run, with_residual, n_out, k_in):
    x, weight = randn(rows, k_in, dtype=torch.bfloat16), randn(n_out, k_in, dtype=torch.bfloat16)
    residual = randn(rows, n_out, dtype=torch.bfloat16) if with_residual else None
    run_mask = torch.tensor(run, dtype=torch.int32, device=DEVICE)

    got = masked_linear(x, weight, run_mask, residual, out=poisoned(rows, n_out, dtype=torch.bfloat16))

    skipped = residual.float() if with_residual else torch.zeros(rows, n_out, device=DEVICE)
    computed = x.float() @ weight.float().T + (skipped if with_residual else 0)
    expect = torch.where(run_mask.bool()[:, None], computed, skipped)
    torch.testing.assert_close(got.float(), expect, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("activation,reference", [("silu", F.silu), ("gelu_tanh", lambda g: F.gelu(g, approximate="tanh"))])
def test_masked_linear_computes_the_gated_activation_of_its_input_as_it_loads_it(activation, reference):
    """The down projection of a masked FFN: x is gate | up, the product's input act(gate) * up
    (rounded to bf16, as the separate activation kernel stores it: a bf16 ulp of each input more
    than the other bf16 products' tolerance); odd width, one row skipping."""
    rows, inter, n_out = 3, 75, 40
    gate_up, weight = randn(rows, 2 * inter, dtype=torch.bfloat16), randn(n_out, inter, dtype=torch.bfloat16)
    residual = randn(rows, n_out, dtype=torch.bfloat16)
    run = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)

    got = masked_linear(gate_up, weight, run, residual, out=poisoned(rows, n_out, dtype=torch.bfloat16),
                        activation=activation)

    gate, up = gate_up.float().chunk(2, -1)
    act = reference(gate) * up
    expect = torch.where(run.bool()[:, None], act @ weight.float().T + residual.float(), residual.float())
    torch.testing.assert_close(got.float(), expect, atol=5e-2, rtol=2e-2)
    assert torch.equal(got[1], residual[1])


def test_masked_linear_without_mask_is_a_linear_layer():
    x, weight = randn(4, 96), randn(48, 96)
    got = masked_linear(x, weight, out=poisoned(4, 48, dtype=torch.float32))
    torch.testing.assert_close(got, x @ weight.T, **TOLERANCE[torch.float32])


@pytest.mark.skipif(not INTERPRETED, reason="counting memory reads needs Triton's interpreter")
def test_masked_linear_reads_no_weight_when_no_row_runs(monkeypatch):
    """The point of the kernel: a skipped FFN reads none of its weights. Every load the
    interpreter performs is recorded; none may touch the weight when no row runs."""
    addresses = record_loads(monkeypatch)
    x, weight, residual = randn(3, 64), randn(200, 64), randn(3, 200)

    out = masked_linear(x, weight, torch.zeros(3, dtype=torch.int32), residual)
    assert reads_of(weight, addresses).sum() == 0 and torch.equal(out, residual)
    masked_linear(x, weight, torch.tensor([0, 1, 0], dtype=torch.int32), residual)
    assert reads_of(weight, addresses).tolist() == [1] * weight.numel()  # one running row: every weight read once


def record_loads(monkeypatch) -> list:
    """Every address Triton's interpreter loads from, from now on (numpy arrays, one a load)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    addresses = []
    original = builder.create_masked_load

    def recording_load(ptrs, mask, *rest):  # the cache/eviction arguments after `other` differ between versions
        addresses.append(ptrs.data[mask.data].copy())
        return original(ptrs, mask, *rest)

    monkeypatch.setattr(builder, "create_masked_load", recording_load)
    return addresses


def reads_of(tensor: torch.Tensor, addresses: list) -> torch.Tensor:
    """How many times each element of `tensor` was loaded (flat, in element order), then forget the loads."""
    start, size = tensor.data_ptr(), tensor.element_size()
    counts = torch.zeros(tensor.numel(), dtype=torch.long)
    for a in addresses:
        inside = a[(a >= start) & (a < start + tensor.numel() * size)]
        counts += torch.bincount(torch.from_numpy((inside - start) // size).long(), minlength=tensor.numel())
    addresses.clear()
    return counts


def gpt_oss_glu(gate, up, limit=1.5, alpha=1.702):
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


GLU = {"silu": lambda g, u: F.silu(g) * u, "gelu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
       "swiglu_clamped": gpt_oss_glu}


@pytest.mark.parametrize("rows,top_k,activation,bias,scale,dtype,tiles", [
    (1, 2, None, False, False, torch.bfloat16, None),  # one row, every slot's input shared
    (5, 3, None, True, True, torch.bfloat16, None),  # biases and routing weights, one row skipping
    (70, 4, None, False, True, torch.float32, None),  # two row tiles, fp32
    (5, 3, "silu", True, True, torch.bfloat16, None),  # a gate|up input per slot, the activation fused
    (3, 2, "gelu_tanh", False, False, torch.float32, None),
    (5, 4, "swiglu_clamped", True, True, torch.float32, None),  # gpt-oss's, clamped at 1.5
    # tiles as a GPU's: several output tiles and steps over K (the interpreter's default is one of each)
    (5, 3, None, True, True, torch.bfloat16, Tiles(32, 32)),
    (5, 3, "swiglu_clamped", True, True, torch.float32, Tiles(16, 16)),
])
def test_expert_linear_applies_each_rows_chosen_experts(rows, top_k, activation, bias, scale, dtype, tiles):
    """out[r, j] = scale[r, j] * (W[chosen[r, j]] x + b[chosen[r, j]]) for running rows, the slots
    of the others left as they were (poisoned); 6 experts of odd sizes."""
    experts, n_out, k_in = 6, 100, 70
    generator = torch.Generator().manual_seed(rows)
    chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(rows)]).to(DEVICE)
    run = (torch.arange(rows, device=DEVICE) % 5 != 1).int()  # row 1 (and every fifth after it) skips
    width = 2 * k_in if activation else k_in
    x = randn(rows, top_k, width, dtype=dtype) * 2 if activation else randn(rows, k_in, dtype=dtype)
    weight = randn(experts, n_out, k_in, dtype=dtype) / 8  # outputs of about 1
    b = randn(experts, n_out, dtype=dtype) if bias else None
    weights = torch.rand(rows, top_k, device=DEVICE) if scale else None
    out = poisoned(rows, top_k, n_out, dtype=torch.float32)

    expert_linear(x, weight, chosen, run, b, weights, activation, limit=1.5, alpha=1.702, out=out, tiles=tiles)

    for r in range(rows):
        if not run[r]:
            assert out[r].isnan().all()  # not written
            continue
        for j, e in enumerate(chosen[r].tolist()):
            inputs = x[r, j].float() if activation else x[r].float()
            if activation:  # the activation's output rounded to the input's dtype, as it is stored
                inputs = GLU[activation](*inputs.chunk(2)).to(dtype).float()
            expect = weight[e].float() @ inputs + (b[e].float() if bias else 0)
            expect = expect * (weights[r, j] if scale else 1)
            torch.testing.assert_close(out[r, j], expect, **TOLERANCE[dtype])


@pytest.mark.skipif(not INTERPRETED, reason="counting memory reads needs Triton's interpreter")
def test_expert_linear_reads_only_the_experts_that_running_rows_chose(monkeypatch):
    """The point of the kernel: the weights of experts that no running row chose are never read,
    and a skipped row chooses none; each chosen expert's weights are read once for all its rows."""
    addresses = record_loads(monkeypatch)
    experts, n_out, k_in = 5, 40, 64
    x, weight = randn(3, k_in), randn(experts, n_out, k_in)
    chosen = torch.tensor([[0, 2], [2, 4], [3, 0]])
    run = torch.tensor([1, 1, 0], dtype=torch.int32)  # the third row, which alone chose expert 3, skips

    expert_linear(x, weight, chosen, run)
    per_expert = reads_of(weight, addresses).view(experts, -1)
    assert per_expert.amax(1).tolist() == [1, 0, 1, 0, 1] and per_expert.amin(1).tolist() == [1, 0, 1, 0, 1]
    expert_linear(x, weight, chosen, torch.zeros(3, dtype=torch.int32))
    assert reads_of(weight, addresses).sum() == 0  # every row skips: no weight byte read


def test_a_mixtures_experts_are_restacked_once_and_viewed():
    """The CUDA backend restacks a mixture's dense experts right after load (before the KV cache is
    sized); the decode step's MaskedMoE then finds the stack and copies nothing."""
    from types import SimpleNamespace

    from engine.backends.cuda.masked_moe import stack_experts, stack_model_experts
    from engine.backends.torch_backend import PlainLinear

    experts = [(PlainLinear(randn(6, 4)), PlainLinear(randn(4, 3), randn(4))) for _ in range(5)]
    before = [(g.weight.clone(), d.weight.clone(), d.bias.clone()) for g, d in experts]
    stack_model_experts(SimpleNamespace(layers=[SimpleNamespace(experts=experts), SimpleNamespace()]))
    gate_up, no_bias = stack_experts([g for g, _ in experts])
    down, down_bias = stack_experts([d for _, d in experts])
    assert gate_up.shape == (5, 6, 4) and no_bias is None and down.shape == (5, 4, 3) and down_bias.shape == (5, 4)
    for e, ((g, d), (g0, d0, b0)) in enumerate(zip(experts, before)):
        assert g.weight.data_ptr() == gate_up[e].data_ptr() and d.bias.data_ptr() == down_bias[e].data_ptr()
        assert torch.equal(g.weight, g0) and torch.equal(d.weight, d0) and torch.equal(d.bias, b0)
    assert stack_experts([d for _, d in experts])[0] is down  # found, not copied again
    square = randn(3, 4, 4)  # views of a stack's rows laid out otherwise (transposed) are restacked
    transposed = [PlainLinear(square[e].t()) for e in range(3)]
    restacked, _ = stack_experts(transposed)
    assert restacked is not square and torch.equal(restacked[1], square[1].t()) and restacked.is_contiguous()


@pytest.mark.parametrize("activation", ["silu", "swiglu_clamped"])
def test_masked_moe_is_the_mixture_for_running_rows_and_identity_for_skipped_ones(activation):
    """Qwen3-MoE's softmax-then-top-k routing with SiLU experts, gpt-oss's top-k-then-softmax with
    biases and the clamped SwiGLU: h + sum of each row's chosen experts, weighed; h bit for bit for
    a row that skips."""
    from types import SimpleNamespace

    from engine.backends.torch_backend import PlainLinear

    rows, hidden, inter, experts, top_k = 4, 64, 48, 6, 2
    gpt_oss = activation == "swiglu_clamped"
    h = randn(rows, hidden, dtype=torch.bfloat16)
    norm = 1 + randn(hidden, dtype=torch.bfloat16) / 4
    router = PlainLinear(randn(experts, hidden, dtype=torch.bfloat16) / 2,
                         randn(experts, dtype=torch.bfloat16) if gpt_oss else None)
    linears = [(PlainLinear(randn(2 * inter, hidden, dtype=torch.bfloat16) / 8,
                            randn(2 * inter, dtype=torch.bfloat16) if gpt_oss else None),
                PlainLinear(randn(hidden, inter, dtype=torch.bfloat16) / 8,
                            randn(hidden, dtype=torch.bfloat16) if gpt_oss else None)) for _ in range(experts)]

    def route(logits):
        top, chosen = logits.float().topk(top_k, dim=-1)
        return top.softmax(-1), chosen

    layer = SimpleNamespace(router=router, experts=linears, route=route, activation=activation,
                            cfg=SimpleNamespace(swiglu_limit=1.5, swiglu_alpha=1.702))
    run = torch.tensor([1, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    dense = h.float().clone()
    x = F.rms_norm(h.float(), (hidden,), norm.float(), 1e-5)
    weights, chosen = route(x @ router.weight.float().T + (router.bias.float() if gpt_oss else 0))
    for r in range(rows):
        for j, e in enumerate(chosen[r].tolist()):
            gate_up, down = linears[e]
            y = x[r] @ gate_up.weight.float().T + (gate_up.bias.float() if gpt_oss else 0)
            y = GLU[activation](*y.chunk(2)) @ down.weight.float().T + (down.bias.float() if gpt_oss else 0)
            dense[r] += weights[r, j] * y

    moe = MaskedMoE(layer, norm, 1e-5)
    assert linears[3][0].weight.data_ptr() == moe.gate_up_weight[3].data_ptr()  # the experts now view the stack
    got = moe(h, run)

    torch.testing.assert_close(got[run.bool()].float(), dense[run.bool()], **TOLERANCE[torch.bfloat16])
    assert torch.equal(got[~run.bool()], h[~run.bool()])
    torch.testing.assert_close(moe(h).float(), dense, **TOLERANCE[torch.bfloat16])  # no mask: every row runs


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_masked_ffn_is_the_ffn_for_running_rows_and_identity_for_skipped_ones(gemma):
    """Llama's FFN (SiLU), and Gemma's (GELU-tanh, its output normed before it joins h)."""
    rows, hidden, inter = 4, 64, 96
    h = randn(rows, hidden, dtype=torch.bfloat16)
    norm = randn(hidden, dtype=torch.bfloat16)
    gate_up, down = randn(2 * inter, hidden, dtype=torch.bfloat16) / 8, randn(hidden, inter, dtype=torch.bfloat16) / 8
    out_norm = 1 + randn(hidden) if gemma else None
    run = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=DEVICE)

    got = MaskedFFN(norm, 1e-5, gate_up, down, "gelu_tanh" if gemma else "silu", out_norm)(h, run)

    gate, up = (F.rms_norm(h.float(), (hidden,), norm.float(), 1e-5) @ gate_up.float().T).chunk(2, -1)
    branch = ((F.gelu(gate, approximate="tanh") if gemma else F.silu(gate)) * up) @ down.float().T
    if gemma:
        branch = F.rms_norm(branch, (hidden,), out_norm, 1e-5)
    dense = h.float() + branch
    torch.testing.assert_close(got[run.bool()].float(), dense[run.bool()], **TOLERANCE[torch.bfloat16])
    assert torch.equal(got[~run.bool()], h[~run.bool()])


@pytest.mark.parametrize("window, softcap", [(None, None), (20, None), (20, 0.5)])
def test_cuda_backends_decode_attention_equals_the_torch_backend_on_the_engines_metadata(window, softcap):
    """The decode attention of the CUDA backend's per-op path (Gemma 2 and 3 on CUDA): the Triton K/V
    write and paged attention give the same cache contents and output as
    engine/backends/torch_backend.py for metadata built by engine/kv/metadata.py."""
    from engine.backends.cuda import CUDABackend
    from engine.backends.torch_backend import TorchBackend
    from engine.kv.metadata import AttentionMetadata

    heads, kv_heads, head_dim, num_blocks = 6, 2, 64, 12
    tables, positions = [[4, 9, 2], [7], [0, 11]], [40, 3, 16]
    meta = AttentionMetadata.for_decode(tables, positions, BLOCK_SIZE, DEVICE, torch.float32)
    k_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim)
    v_cache = randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim)
    q, k, v = randn(3, heads, head_dim), randn(3, kv_heads, head_dim), randn(3, kv_heads, head_dim)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expect = TorchBackend().attention(q, k, v, k_ref, v_ref, meta, 0.125, window, softcap)

    got = CUDABackend().attention(q, k, v, k_cache, v_cache, meta, 0.125, window, softcap)

    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    torch.testing.assert_close(got, expect, **TOLERANCE[torch.float32])
