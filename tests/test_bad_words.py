"""vLLM's `bad_words`: an answer never holds a bad word's token sequences (the word alone and after a
space), one-token words refused everywhere, longer ones at their last token; other requests in
the same batch keep their answers."""
from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from engine.bad_words import bad_word_ids, banned_next
from tests.conftest import cpu_path_only

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat(server, **extra) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def holds(ids: list[int], seq: tuple[int, ...]) -> bool:
    return any(tuple(ids[i:i + len(seq)]) == seq for i in range(len(ids) - len(seq) + 1))


def test_the_answer_never_writes_a_bad_word(engine):
    from engine.sampling_params import SamplingParams

    prompt = engine.tokenizer.encode_chat(QUESTION)
    (text, ids, _), = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0))
    words = ["Paris", "capital of"]
    seqs = bad_word_ids(lambda t: engine.tokenizer.encode(t, False), words)
    assert "Paris" in text and any(holds(ids, seq) for seq in seqs)  # the unrestricted answer names it
    (barred_text, barred, _), = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, bad_words=words))
    assert barred and not any(holds(barred, seq) for seq in seqs), barred_text
    assert "Paris" not in barred_text
    # sampled: each position refuses what would finish a word
    (_, sampled, _), = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=1.2, seed=3, n=1,
                                                                bad_words=words))
    assert not any(holds(sampled, seq) for seq in seqs)


@cpu_path_only
def test_a_neighbour_in_the_batch_keeps_its_answer(server):
    alone = chat(server, max_tokens=16)["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        barred = [pool.submit(chat, server, max_tokens=16, bad_words=["Paris"]) for _ in range(3)]
        plain = pool.submit(chat, server, max_tokens=16)
        assert plain.result()["choices"][0]["message"]["content"] == alone
        assert all("Paris" not in b.result()["choices"][0]["message"]["content"] for b in barred)


@pytest.mark.parametrize("value, param", [
    ([""], "bad_words"), (["   "], "bad_words"), (["x" * 129], "bad_words"), (["w"] * 65, "bad_words"),
    ("Paris", "bad_words"), ([5], "bad_words.0"),
])
def test_bad_values_are_400s(server, value, param):
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "bad_words": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_sequences_and_what_they_refuse():
    vocab = {"Paris": [7], " Paris": [8], "New York": [3, 4], " New York": [9, 3, 4], "a b": [1, 2], " a b": [5, 2]}
    encode = vocab.__getitem__
    seqs = bad_word_ids(encode, ["Paris", "  New York", "a b"])
    # " New York" is a token longer than "New York": a lone space would be refused, so it is left out
    assert seqs == ((7,), (8,), (3, 4), (1, 2), (5, 2))
    assert banned_next(seqs, []) == {7, 8}  # one-token words: everywhere, from the first token
    assert banned_next(seqs, [6, 3]) == {7, 8, 4}
    assert banned_next(seqs, [1]) == {7, 8, 2} and banned_next(seqs, [5]) == {7, 8, 2}
    assert banned_next(seqs, [3, 6]) == {7, 8}
