"""CPU prefill attention runs on the native decode kernel, each prompt token a row attending to its
own positions (`CPUBackend.attention`): a token's numbers depend on its position and the cache
alone. So a prompt's logits have the same bits whole, in chunks split inside a block, beside another
sequence in the same forward, and decoded token by token, with fp32, fp16 and int8 caches, dense
and quantized weights. Under SDPA (before) a chunk's last rows differed from a whole prefill's in
their last bits, by the chunk's length, and the quantized kernels' int16 activations and the int8
cache's rounding turned that into logits 0.002-0.05 apart."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import engine_like

TEXT = ("The history of the bicycle begins in the early nineteenth century, when inventors built machines that "
        "riders pushed along with their feet. ") * 4


@pytest.fixture(scope="module", params=["fp32 weights, fp32 cache", "quantized, float16 cache", "quantized, int8 cache"])
def any_engine(request, engine):
    if not engine.runner.backend.native:
        pytest.skip("the native kernels did not load (no g++, or a CPU without AVX2)")
    if request.param.startswith("fp32"):
        return engine
    return engine_like(engine, dtype="auto", max_num_seqs=2, kv_cache_dtype=request.param.split(", ")[1].split()[0])


def prefilled(engine, chunks: list[list[int]]) -> torch.Tensor:
    """Logits at every position of the prompt made of `chunks`, one prefill forward a chunk."""
    runner, prompt = engine.runner, [t for c in chunks for t in c]
    out, start = [], 0
    with engine.kv_blocks([len(prompt)]) as (table,):
        for chunk in chunks:
            out.append(runner.logits(runner.prefill([(chunk, table, start)])))
            start += len(chunk)
    return torch.cat(out)


def test_a_prompts_logits_have_the_same_bits_whole_in_chunks_and_token_by_token(any_engine):
    runner = any_engine.runner
    prompt = any_engine.tokenizer.encode(TEXT)[:83]
    whole = prefilled(any_engine, [prompt])
    for cuts in ([37], [5, 16, 41, 77], [82]):  # inside blocks of 16, on one, the last token alone
        bounds = [0, *cuts, len(prompt)]
        assert torch.equal(prefilled(any_engine, [prompt[a:b] for a, b in zip(bounds, bounds[1:])]), whole), cuts
    with any_engine.kv_blocks([len(prompt)]) as (table,):
        runner.prefill([(prompt[:9], table, 0)])
        decoded = [runner.logits(runner.decode([t], [p], [table]))[0] for p, t in enumerate(prompt[9:], 9)]
    assert torch.equal(torch.stack(decoded), whole[9:])
    # what SDPA gave: the same arithmetic's order by the chunk's length; the check above has teeth
    runner.backend.prefill_as_rows = False
    try:
        bounds = [0, 37, len(prompt)]
        assert not torch.equal(prefilled(any_engine, [prompt[a:b] for a, b in zip(bounds, bounds[1:])]), whole)
    finally:
        runner.backend.prefill_as_rows = True


def test_sequences_in_one_forward_have_their_own_bits(any_engine):
    runner = any_engine.runner
    first, second = any_engine.tokenizer.encode(TEXT)[:45], any_engine.tokenizer.encode(TEXT[100:])[:29]
    alone = [prefilled(any_engine, [p]) for p in (first, second)]
    with any_engine.kv_blocks([len(first), len(second)]) as (a, b):
        together = runner.logits(runner.prefill([(first, a, 0), (second, b, 0)]))
    assert torch.equal(together, torch.cat(alone))


def test_a_long_prompts_rows_share_work_and_keep_their_bits(any_engine):
    """Rows past 256 positions are attended in parts, and consecutive rows of a prompt share the
    items of their whole parts: a 700-token prompt has the same bits in one forward, in forwards
    of 650 and 50, and decoding its last tokens."""
    runner = any_engine.runner
    prompt = (any_engine.tokenizer.encode(TEXT) * 8)[:700]
    assert len(prompt) == 700
    whole = prefilled(any_engine, [prompt])
    assert torch.equal(prefilled(any_engine, [prompt[:650], prompt[650:]]), whole)
    with any_engine.kv_blocks([len(prompt)]) as (table,):
        runner.prefill([(prompt[:690], table, 0)])
        decoded = [runner.logits(runner.decode([t], [p], [table]))[0] for p, t in enumerate(prompt[690:], 690)]
    assert torch.equal(torch.stack(decoded), whole[690:])


@pytest.mark.parametrize("rows", [0, 512])  # the chunks as prefill forwards, or as decode rows
def test_a_prompt_chunked_otherwise_beside_another_one_samples_the_same_numbers(any_engine, rows, monkeypatch):
    """Prompts share a step's prefill budget (512 tokens), so how a prompt is chunked depends on
    what else is in flight: alone, 600 tokens go as 512 + 88; behind a 300-token prompt, as 212 +
    388. Its logprobs, greedy or seeded, have the same bits either way (nothing cached)."""
    from engine.sampling_params import SamplingParams

    monkeypatch.setattr(any_engine.blocks, "prefix_caching", False)
    runner, chunks = any_engine.runner, []
    monkeypatch.setattr(runner, "short_chunk_rows", rows)
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda batch: chunks.append([(c.start, c.end - c.start) for c in batch.prefills])
                        or run(batch))
    text = any_engine.tokenizer.encode(TEXT * 8)
    prompt, other = text[:600], text[50:350]
    assert len(prompt) == 600 and any_engine.scheduler.max_prefill_tokens == 512
    for params in (SamplingParams(temperature=0.0, max_tokens=6, logprobs=2),
                   SamplingParams(temperature=0.9, seed=11, max_tokens=6, logprobs=2)):
        chunks.clear()
        (_, alone, out_alone), = any_engine.generate([prompt], params)
        assert [c for c in chunks if c] == [[(0, 512)], [(512, 88)]]
        chunks.clear()
        (_, _, _), (_, beside, out_beside) = any_engine.generate([other, prompt], params)
        assert [c for c in chunks if c] == [[(0, 300), (0, 212)], [(212, 388)]]
        assert beside == alone
        assert [(t.logprob, [a[2] for a in t.top]) for t in out_beside.logprobs] == \
            [(t.logprob, [a[2] for a in t.top]) for t in out_alone.logprobs]
