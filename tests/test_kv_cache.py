"""The paged KV cache in the engine: admission by free blocks and batch rows, preemption under block
pressure that changes no token, and every block returned by aborts and finishes."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.helpers import assert_all_blocks_back, engine_like


def test_abort_frees_kv_blocks(engine, chat_prompts):
    assert_all_blocks_back(engine)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("to-abort", chat_prompts[0], params)
    engine.add_request("to-keep", chat_prompts[1], SamplingParams(temperature=0.0, max_tokens=4))
    for _ in range(4):
        engine.step()
    (aborted,) = [s for s in engine.scheduler.running if s.request_id == "to-abort"]
    held = list(aborted.block_table)
    assert held and all(engine.blocks.ref_counts[b] >= 1 for b in held)
    engine.abort("to-abort")
    assert all(s.request_id != "to-abort" for s in [*engine.scheduler.running, *engine.scheduler.waiting])
    keep = [b for s in engine.scheduler.running for b in s.block_table]
    assert all(engine.blocks.ref_counts[b] == keep.count(b) for b in held)  # given back before any step
    while engine.has_work:
        engine.step()
    assert_all_blocks_back(engine)


def test_requests_beyond_the_batch_rows_wait_then_run(engine, chat_prompts):
    rows = engine.config.max_num_seqs
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for i in range(rows + 3):
        engine.add_request(f"many-{i}", chat_prompts[i % len(chat_prompts)], params)
    engine.step()
    assert engine.num_running == rows and engine.num_waiting == 3
    done = set()
    while engine.has_work:
        done |= {o.request_id for o in engine.step()[0] if o.finished}
    assert len(done) == rows + 3
    assert_all_blocks_back(engine)


def test_24_short_requests_run_together_in_6144_tokens_of_2048_token_sequences(paged_engine, chat_prompts):
    """Slots of max_model_len would allow 3; blocks hold what the requests really use."""
    eng = paged_engine
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(24):
        eng.add_request(f"short-{i}", chat_prompts[i % len(chat_prompts)], params)
    most_decoding, steps = 0, 0
    while eng.has_work:
        most_decoding = max(most_decoding, sum(not s.is_prefilling for s in eng.scheduler.running))
        eng.step()
        steps += 1
        if steps == 2:  # admitted as the prefill budget allows: all within two steps
            assert eng.num_running == 24 and eng.num_waiting == 0
    assert most_decoding == 24  # every request in one decode batch
    assert eng.num_preemptions_total == 0
    assert_all_blocks_back(eng)


def test_preemption_under_block_pressure_keeps_the_same_greedy_tokens(engine, chat_prompts):
    """20 blocks for 5 sequences that grow to ~7 blocks each: the newest are preempted, go back to
    the queue with their tokens, recompute their K/V later and finish with the tokens a run with
    room to spare gives."""
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    prompts = chat_prompts[:5]
    roomy = [ids for _, ids, _ in engine.generate(prompts, params)]
    tight = engine_like(engine, kv_capacity_tokens=20 * engine.config.block_size, max_model_len=256)
    pressed = tight.generate(prompts, params)
    assert tight.num_preemptions_total > 0
    assert [ids for _, ids, _ in pressed] == roomy
    assert [o.completion_tokens for _, _, o in pressed] == [64] * 5
    assert [o.cached_tokens for _, _, o in pressed] == [0] * 5  # first admissions found nothing cached
    assert_all_blocks_back(tight)


def test_preempted_prompts_are_counted_once(engine, chat_prompts):
    """Prefilled plus cached prompt tokens add up to the prompts, however often they are replayed."""
    prompts = [p * 3 for p in chat_prompts[:4]]  # ~100-token prompts, prefilled in 32-token chunks
    tight = engine_like(engine, kv_capacity_tokens=24 * engine.config.block_size, max_model_len=256,
                        max_prefill_tokens=32)
    tight.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    assert tight.num_preemptions_total > 0
    assert tight.prompt_tokens_total + tight.prompt_tokens_cached_total == sum(len(p) for p in prompts)


def test_a_prompt_that_ends_inside_the_caches_last_block_is_admitted(engine, chat_prompts):
    """A cache of exactly one context (8 blocks, 128 tokens): a 120-token prompt needs 8 blocks with
    its first generated token's K/V. Admission once asked for a whole spare block besides (9), so
    it waited forever, and every request behind it with it."""
    small = engine_like(engine, kv_capacity_tokens=128, max_model_len=128)
    prompt = (chat_prompts[0] * 8)[:120]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    (_, ids, out), (_, after, _) = small.generate([prompt, chat_prompts[1]], params)
    assert len(ids) == 8 and out.finish_reason == "length" and len(after) == 8
    assert_all_blocks_back(small)



def test_a_sequence_no_empty_cache_could_hold_fails_its_request_alone(engine, chat_prompts, monkeypatch):
    """Should admission ever ask more than the whole cache has (here it is made to, for the first
    request), the request at the head of the queue fails, and those behind it run."""
    small = engine_like(engine, kv_capacity_tokens=128, max_model_len=128)
    monkeypatch.setattr(small.scheduler, "_first_decode_blocks", lambda seq: 9 if seq.request_id == "offline-0" else 0)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (_, ids, out), (_, after, _) = small.generate(chat_prompts[:2], params)
    assert out.finish_reason == "error" and "KV cache" in out.error and ids == []
    assert len(after) == 4
    assert_all_blocks_back(small)


def test_kv_blocks_that_cannot_all_be_had_give_back_those_taken(engine):
    """Tables outside the scheduler (calibration, the quality harness): the first taken, the second
    too large for the pool; the first goes back (it stayed referenced)."""
    too_many = (engine.blocks.num_blocks + 1) * engine.config.block_size
    with pytest.raises(RuntimeError, match="KV blocks asked"):
        with engine.kv_blocks([32, too_many]):
            pass
    assert_all_blocks_back(engine)


@pytest.mark.parametrize("window", [None, 5])
def test_a_first_chunk_as_sdpas_causal_flag_is_the_masked_prefill(window):
    """CUDA takes a prompt's first chunk as SDPA's `is_causal` (its flash kernel takes grouped KV
    heads but no mask); that is the mask's attention, for first chunks and later ones side by side."""
    import torch

    from engine.backends.torch_backend import prefill_attention, write_kv
    from engine.kv.metadata import AttentionMetadata

    torch.manual_seed(0)
    heads, kv_heads, dim, block = 6, 2, 16, 8
    chunks = [(list(range(0, 5)), 0, 37), (list(range(5, 10)), 16, 19)]  # a whole prompt, a later chunk
    tokens = sum(n for _, _, n in chunks)
    q, k, v = (torch.randn(tokens, h, dim) for h in (heads, kv_heads, kv_heads))
    k_cache, v_cache = (torch.randn(10, kv_heads, block, dim) for _ in range(2))
    meta = AttentionMetadata.for_prefill(chunks, block, "cpu")
    write_kv(k, v, k_cache, v_cache, meta)
    masked = prefill_attention(q, k, v, k_cache, v_cache, meta, dim ** -0.5, window)
    causal = prefill_attention(q, k, v, k_cache, v_cache, meta, dim ** -0.5, window, causal=True)
    assert torch.allclose(masked, causal, atol=1e-5)
