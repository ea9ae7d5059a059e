"""Speculative decoding by n-gram lookup (engine/ngram_drafter.py, `--speculative-tokens`): drafts
come from the sequence's own tokens and are checked as decode rows of their sequence, and the
text is the text decoding without drafts gives, token for token, greedy or sampled."""
from __future__ import annotations

import math

import httpx
import pytest

from engine.ngram_drafter import NgramDrafter
from engine.sampling_params import SamplingParams, SkipParams
from tests.conftest import ServerProcess, cpu_path_only
from tests.helpers import assert_all_blocks_back, engine_like

MODEL = "smollm2-135m-instruct"
PASSAGE = ("The scheduler decides what each engine step computes. Each step, oldest first, every decoding "
           "sequence gets room for the token it writes, and waiting sequences are admitted in arrival order "
           "while the batch has rows and blocks for their prefill plus one more.")
COPY = [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{PASSAGE}"}]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


@pytest.mark.parametrize("tokens, k, draft", [
    ([1, 2, 3, 4, 9, 1, 2, 3], 2, [4, 9]),  # what followed the earlier "1 2 3"
    ([5, 6, 7, 5, 6, 8, 5, 6], 3, [8, 5, 6]),  # the latest earlier occurrence, up to the end
    ([1, 2, 3, 0, 2, 3, 7, 1, 2, 3], 1, [0]),  # the longest n-gram first ("1 2 3", not "2 3")
    ([7, 4, 8, 4], 2, []),  # one repeated token is no clue
    ([1, 2, 3, 4], 2, []),  # nothing repeats
])
def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_ngram(tokens, k, draft):
    assert NgramDrafter(k).draft(tokens, k) == draft


def test_a_drafter_kept_as_the_sequence_grows_drafts_as_a_fresh_one():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5, 3, 1, 4]
    kept = NgramDrafter(4)
    for end in range(1, len(tokens) + 1):
        assert kept.draft(tokens[:end], 4) == NgramDrafter(4).draft(tokens[:end], 4)


def test_the_next_draft_is_one_longer_than_what_was_taken_and_misses_wait():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    drafter = NgramDrafter(4)
    assert drafter.draft(tokens, 8) == [3, 4, 5, 6]  # up to its most
    drafter.taken(4, 1)
    assert drafter.draft(tokens, 8) == [3, 4]  # one more than the one token taken
    drafter.taken(2, 0)
    assert drafter.draft(tokens, 8) == []  # the first token missed: one step without a draft
    assert drafter.draft(tokens, 8) == [3]
    drafter.taken(1, 0)
    assert [drafter.draft(tokens, 8) for _ in range(4)] == [[], [], [], [3]]  # a second miss: three steps
    drafter.taken(1, 1)
    assert drafter.draft(tokens, 8) == [3, 4]


def test_a_drafter_whose_drafts_are_seldom_taken_waits_until_drafting_pays():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    drafter = NgramDrafter(4)
    drafter.taken(4, 1)  # a quarter taken: acceptance (1 + 0.25) / 2
    assert drafter.acceptance == 0.625
    assert drafter.draft(tokens, 8, needed=0.7) == []  # below what a draft must reach in this step
    assert drafter.draft(tokens, 8, needed=0.7) == []
    assert drafter.draft(tokens, 8, needed=0.7) == [3, 4]  # regained a little each step: it tries again
    assert drafter.draft(tokens, 8, needed=0.2) == [3, 4]


@pytest.fixture(scope="module")
def speculative(engine):
    spec = engine_like(engine, speculative_tokens=4)
    if not spec.speculative_tokens:
        pytest.skip("speculation needs the native CPU decode step (no compiler here, or not this model)")
    return spec


def run(engine, prompts, params, skip=None):
    """Every prompt at once -> per prompt and choice: token ids, text, logprobs and finish reason; and
    the engine's accepted draft tokens during the run."""
    before = engine.accepted_draft_tokens_total
    got = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params, skip)
    while engine.has_work:
        outs = engine.step()[0]
        assert len({(o.request_id, o.index) for o in outs}) == len(outs)  # one output a sequence and step
        for out in outs:
            ids, text, logprobs, _ = got.get((out.request_id, out.index), ([], "", [], None))
            got[(out.request_id, out.index)] = (ids + out.token_ids, text + out.text, logprobs + (out.logprobs or []),
                                                out.finish_reason)
    return [v for _, v in sorted(got.items())], engine.accepted_draft_tokens_total - before


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=64, temperature=0),
    SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, seed=11, n=2),
    SamplingParams(max_tokens=64, temperature=0.7, seed=5, frequency_penalty=0.4, repetition_penalty=1.1,
                   stop=["lighthouse keeper"], min_tokens=12),
], ids=["greedy", "sampled-n2", "penalties-stop-min-tokens"])
def test_speculation_gives_the_text_of_decoding_without_drafts(engine, speculative, params):
    prompts = [engine.tokenizer.encode_chat(COPY), engine.tokenizer.encode_chat(STORY)]
    solo = [choice for p in prompts for choice in run(engine, [p], params)[0]]
    together, accepted = run(speculative, prompts, params)
    assert together == solo  # token ids, text and finish reason of every choice, both prompts in one batch
    if params.greedy:  # (sampled text differs between hosts' kernels: whether it copies is chance)
        assert accepted > 0  # the copy's drafts were taken
    assert_all_blocks_back(speculative)


def test_drafting_sequences_preempted_for_kv_blocks_keep_their_text(engine):
    """A cache for 480 tokens and four copies of ~180 tokens each: sequences are preempted and
    recompute, with drafts before and after."""
    small = engine_like(engine, speculative_tokens=4, kv_capacity_tokens=480, max_model_len=320, max_num_seqs=4)
    if not small.speculative_tokens:
        pytest.skip("speculation needs the native CPU decode step")
    params = SamplingParams(max_tokens=96, temperature=0)
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": f"{i}. " + COPY[0]["content"]}])
               for i in range(4)]
    solo = [choice for p in prompts for choice in run(engine, [p], params)[0]]
    together, accepted = run(small, prompts, params)
    assert together == solo and accepted > 0 and small.num_preemptions_total > 0
    assert_all_blocks_back(small)


def test_logprobs_of_accepted_drafts_are_their_own(engine, speculative):
    params = SamplingParams(max_tokens=48, temperature=0, logprobs=3)
    prompt = engine.tokenizer.encode_chat(COPY)
    (drafted,), accepted = run(speculative, [prompt], params)
    (plain,), _ = run(engine, [prompt], params)
    assert drafted[0] == plain[0] and drafted[1] == plain[1] and accepted > 0
    assert len(drafted[2]) == len(drafted[0])  # one entry per token, with its 3 alternatives
    # the same to fp32 noise: where one engine holds the prompt in its prefix cache and the other does
    # not, one computes the prompt's tail as decode rows and the other as a prefill forward
    for ours, theirs in zip(drafted[2], plain[2]):
        assert ours.token_id == theirs.token_id and math.isclose(ours.logprob, theirs.logprob, abs_tol=1e-4)
        assert [t for _, t, _ in ours.top] == [t for _, t, _ in theirs.top]


def test_rows_that_skip_ffns_get_no_drafts_and_keep_their_text(engine, speculative):
    params = SamplingParams(max_tokens=64, temperature=0)
    skip = SkipParams(budget=0.25, threshold=0.5, warmup_tokens=2)
    prompt = engine.tokenizer.encode_chat(COPY)
    (plain,), _ = run(engine, [prompt], params, skip)
    (drafted,), accepted = run(speculative, [prompt], params, skip)
    assert drafted == plain and accepted == 0


@cpu_path_only
def test_a_server_with_speculation_answers_as_one_without_and_counts_its_drafts(server, client, speculative):
    srv = ServerProcess("--speculative-tokens", "4", "--max-model-len", "1024", "--max-batch", "4")
    try:
        import openai

        fast = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        plain = client.chat.completions.create(model=MODEL, messages=COPY, max_tokens=64, temperature=0)
        drafted = fast.chat.completions.create(model=MODEL, messages=COPY, max_tokens=64, temperature=0)
        assert drafted.choices[0].message.content == plain.choices[0].message.content
        streamed = fast.chat.completions.create(model=MODEL, messages=COPY, max_tokens=64, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            plain.choices[0].message.content
        made = 2 * drafted.usage.completion_tokens
        assert 0 < srv.metric("spec_accepted_tokens_total") <= srv.metric("spec_draft_tokens_total")
        assert srv.metric("generation_tokens_total") == made
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
