"""/v1/embeddings (engine/pooling.py): an input's vector is the mean (or, with `--pooling last`,
the last) of the model's final normed hidden states, at unit length. It equals HF transformers'
on the same fp32 weights, in one prefill chunk or many, alone or in a batch, with the prefix cache
warm, and when the sequence is preempted halfway; over HTTP, through the `openai` SDK, beside
generation that it leaves unchanged."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import math
import struct

import httpx
import openai
import pytest
import torch

from engine.pooling import Pooling
from engine.sampling_params import SamplingParams
from tests.conftest import cpu_path_only
from tests.helpers import assert_all_blocks_back, engine_like, wait_idle

MODEL = "smollm2-135m-instruct"
TEXTS = ["The cat sat on the mat.",
         "Embeddings map text to vectors; similar texts get nearby vectors. " * 12,  # ~170 tokens
         "Paris"]


def hf_embedding(hf_model, ids: list[int], method: str) -> torch.Tensor:
    with torch.inference_mode():
        states = hf_model.model(torch.tensor([ids])).last_hidden_state[0].double()  # after the final norm
    pooled = states.mean(0) if method == "mean" else states[-1]
    return pooled / pooled.norm()


def close(ours: list[float], theirs: torch.Tensor, tol: float = 2e-5) -> bool:
    """Unit vectors within fp32 summation-order noise (~1e-5 relative over 30 layers)."""
    return (torch.tensor(ours, dtype=torch.float64) - theirs).abs().max().item() < tol


def _outputs(engine, inputs: list[list[int]], request_id: str = "embed") -> tuple[dict, list]:
    """One embeddings request run to completion beside whatever the engine holds -> ({index: output},
    its sequences)."""
    seqs = engine.prepare_embeddings(request_id, inputs)
    engine.add_sequences(seqs)
    outs = {}
    while engine.has_work:
        for out in engine.step()[0]:
            if out.request_id == request_id:
                assert out.finished and out.error is None and out.index not in outs
                outs[out.index] = out
    return outs, seqs


@pytest.fixture(scope="module")
def inputs(engine):
    return [engine.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def chunked(engine):
    return engine_like(engine, max_prefill_tokens=48)  # the long input in 4 chunks, others beside it


@pytest.mark.parametrize("method", ["mean", "last"])
def test_vectors_equal_hf_in_one_chunk_or_many_alone_or_batched(engine, chunked, hf_model, inputs, method,
                                                                 monkeypatch):
    for eng in (engine, chunked):
        monkeypatch.setattr(eng.config, "pooling", method)
        batched = eng.embed(inputs)
        for ids, vector in zip(inputs, batched):
            assert len(vector) == engine.model_config.hidden_size
            assert math.isclose(math.fsum(x * x for x in vector), 1.0, abs_tol=1e-9)
            assert close(vector, hf_embedding(hf_model, ids, method))
        if eng is engine:  # the same chunks alone: a row's sums do not depend on its neighbours (where
            # the chunks' bounds move, so do the last bits, as in generation)
            assert [eng.embed([ids])[0] for ids in inputs] == batched
        assert_all_blocks_back(eng)


def test_the_prefix_cache_serves_last_pooling_and_never_mean(engine, hf_model, inputs, monkeypatch):
    """Mean pooling needs every position's state, which a cached block does not keep: the input
    is computed again. The last position is always computed, so `last` takes the cached prefix."""
    long = inputs[1]
    engine.generate([long + [28]], SamplingParams(max_tokens=1, temperature=0))  # the prefix cache holds it
    for method, cached in (("mean", False), ("last", True)):
        monkeypatch.setattr(engine.config, "pooling", method)
        out = _outputs(engine, [long], f"cached-{method}")[0][0]
        assert (out.cached_tokens > 0) == cached
        assert out.prompt_tokens == len(long) and out.completion_tokens == 0 and out.token_ids == []
        assert close(out.embedding, hf_embedding(hf_model, long, method))


def test_an_input_preempted_halfway_pools_each_position_once(engine, hf_model, inputs):
    """8 blocks of 16 tokens, 2 prefill tokens a step: an older request decoding past its blocks
    preempts the input (the newest sequence) while it is being computed; computed again, each
    position is pooled once."""
    small = engine_like(engine, kv_capacity_tokens=128, max_model_len=128, max_prefill_tokens=2, prefix_caching=False)
    text = small.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs away. " * 3)[:50]
    other = small.tokenizer.encode("Count the stars in the sky tonight, one by one, slowly. " * 8)[:47]
    small.add_request("other", other, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    outs, (seq,) = _outputs(small, [text])
    assert seq.num_preemptions > 0
    assert close(outs[0].embedding, hf_embedding(hf_model, text, "mean"))
    assert_all_blocks_back(small)


def test_an_aborted_request_leaves_no_output_and_gives_its_blocks_back(chunked, inputs):
    chunked.add_sequences(chunked.prepare_embeddings("gone", inputs))
    outputs, _ = chunked.step()  # the first 48 tokens: the long input is still being computed
    assert [o.index for o in outputs] == [0]
    chunked.abort("gone")
    assert not chunked.has_work and not chunked.step()[0]
    assert_all_blocks_back(chunked)


def test_pooling_counts_each_position_once_when_chunks_repeat():
    pooling = Pooling("mean")
    pooling.add(pooling.positions(0, 3, 5), [3.0, 0.0])
    assert pooling.positions(0, 2, 5) == range(3, 2)  # a preempted input's first chunk again: nothing new
    pooling.add(pooling.positions(2, 5, 5), [0.0, 4.0])  # positions 3 and 4 only
    assert pooling.rows == 5 and pooling.vector() == [0.6, 0.8]
    last = Pooling("last")
    assert not last.positions(0, 4, 5) and last.positions(4, 5, 5) == range(4, 5)
    with pytest.raises(ValueError):
        Pooling("cls")
    overflowed = Pooling("mean")
    overflowed.add(range(0, 1), [math.inf, 0.0])
    with pytest.raises(ValueError, match="not finite"):
        overflowed.vector()


# ---- over HTTP -----------------------------------------------------------------------------------

def test_the_sdk_gets_unit_vectors_in_input_order_with_usage(server, client):
    texts = ["first text", "a second, longer text than the first", "third"]
    r = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
    assert r.object == "list" and r.model == MODEL and [d.index for d in r.data] == [0, 1, 2]
    counts = [httpx.post(server.url + "/tokenize", json={"prompt": t}, timeout=30).json()["count"] for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(counts)
    for d in r.data:
        assert d.object == "embedding" and len(d.embedding) == 576
        assert math.isclose(math.fsum(x * x for x in d.embedding), 1.0, abs_tol=1e-5)
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    for a, b in zip(r.data, floats.data):  # base64 holds the same vector as float32
        assert a.embedding == list(struct.unpack("<576f", struct.pack("<576f", *b.embedding)))
    assert r.data[0].embedding != r.data[2].embedding


def test_one_text_token_ids_and_raw_base64_agree(server, client):
    text = "Vectors for search."
    ids = httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]
    one = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
    by_ids = client.embeddings.create(model=MODEL, input=[ids], encoding_format="float").data[0].embedding
    assert one == by_ids
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": ids, "encoding_format": "base64",
                                                          "dimensions": 576}, timeout=60).json()
    assert list(struct.unpack("<576f", base64.b64decode(raw["data"][0]["embedding"]))) == \
        list(struct.unpack("<576f", struct.pack("<576f", *one)))


def test_a_conversation_is_embedded_as_its_rendered_prompt(server, client):
    """vLLM's chat form: `messages` rendered by the template (no assistant turn opened unless
    `add_generation_prompt`), one vector, the same as the rendered prompt's ids give."""
    messages = [{"role": "system", "content": "You sort mail."}, {"role": "user", "content": "Invoice for May"}]
    for opened in (False, True):
        ids = httpx.post(server.url + "/tokenize", json={"messages": messages, "add_generation_prompt": opened},
                         timeout=30).json()["tokens"]
        body = {"model": MODEL, "messages": messages} | ({"add_generation_prompt": True} if opened else {})
        r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60).json()
        by_ids = client.embeddings.create(model=MODEL, input=[ids], encoding_format="float")
        assert len(r["data"]) == 1 and r["usage"]["prompt_tokens"] == len(ids) == by_ids.usage.prompt_tokens
        assert r["id"].startswith("embd-") and isinstance(r["created"], int)  # (vLLM's fields beside OpenAI's)
        assert max(abs(a - b) for a, b in zip(r["data"][0]["embedding"], by_ids.data[0].embedding)) < 1e-6
    text = "no special tokens"
    plain = client.embeddings.create(model=MODEL, input=text, extra_body={"add_special_tokens": False})
    count = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30)
    assert plain.usage.prompt_tokens == count.json()["count"]


@pytest.mark.parametrize("body, status, param", [
    ({"input": ""}, 400, "input"),
    ({"input": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "input"),  # one or the other
    ({"input": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),  # (messages' setting)
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, 400, "messages"),  # longer than the context
    ({"input": []}, 400, "input"),
    ({"input": ["fine", ""]}, 400, "input.1"),
    ({"input": [[1, 2], []]}, 400, "input"),
    ({"input": ["text", [1, 2]]}, 400, "input"),
    ({"input": [1, 99999999]}, 400, "input"),
    ({"input": [[5], [-1]]}, 400, "input.1"),
    ({"input": [7] * 2049}, 400, "input"),  # longer than the server's 2,048-token context
    ({"input": ["x"] * 2049}, 400, "input"),  # more than OpenAI takes
    ({"input": [[5]] * 90 + [[7] * 2049]}, 400, "input.90"),  # checked before the first window goes in
    ({"input": "text", "dimensions": 64}, 400, "dimensions"),
    ({"input": "text", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "text", "pooling": "cls"}, 400, "pooling"),
    ({"input": "text", "model": "no-such-model"}, 404, "model"),
    ({"model": MODEL}, 400, "input"),
])
def test_bad_input_is_an_openai_error(server, body, status, param):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, field", [("/v1/embeddings", "input"), ("/v1/completions", "prompt")])
@pytest.mark.parametrize("value", [{"a": 1}, 7, None])
def test_an_input_of_no_shape_taken_says_what_is_taken(server, path, field, value):
    r = httpx.post(server.url + path, json={"model": MODEL, field: value}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": f"{field} must be a string, a list of token ids, a list of strings or a "
                                 "list of token id lists", "type": "invalid_request_error", "param": field,
                                 "code": None}


def test_the_sdk_raises_a_bad_request_for_an_empty_input(client):
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="")


@cpu_path_only
def test_embeddings_beside_a_chat_leave_its_answer_and_are_counted(server, client):
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=96,
                temperature=0, extra_body={"ignore_eos": True})  # long enough to decode beside the embeddings
    alone = client.chat.completions.create(**chat).choices[0].message.content
    before = server.metric("embedding_inputs_total")
    long_texts = ["A long passage to embed while the chat decodes. " * 30] * 3
    stream = client.chat.completions.create(stream=True, **chat)
    chunks = [next(stream)]  # its prompt is computed: the embeddings' chunks come beside its decode steps
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        embeds = [pool.submit(client.embeddings.create, model=MODEL, input=long_texts) for _ in range(2)]
        chunks += list(stream)
        vectors = [f.result().data for f in embeds]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone
    # one text, three vectors: the same up to the last bits where the chunks' bounds fall elsewhere in it
    # (a chunk attends to its own K/V in fp32 and to earlier chunks' from the fp16 cache)
    same = [vectors[0][0].embedding, vectors[0][2].embedding, vectors[1][1].embedding]
    assert all(max(abs(a - b) for a, b in zip(same[0], v)) < 1e-3 for v in same[1:])
    assert server.metric("embedding_inputs_total") == before + 6


def test_a_batch_larger_than_the_queue_is_fed_a_window_at_a_time(server, client):
    texts = [f"Note {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7} marbles." for i in range(120)]
    before = server.metric("embedding_inputs_total")
    r = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")  # the queue holds 80: windows of 32
    assert [d.index for d in r.data] == list(range(120))
    counts = [httpx.post(server.url + "/tokenize", json={"prompt": t}, timeout=30).json()["count"] for t in texts]
    assert r.usage.prompt_tokens == sum(counts)
    for i in (0, 31, 32, 119):  # each input's own vector, at windows' edges
        alone = client.embeddings.create(model=MODEL, input=texts[i], encoding_format="float").data[0].embedding
        assert max(abs(a - b) for a, b in zip(alone, r.data[i].embedding)) < 1e-5
    assert server.metric("embedding_inputs_total") == before + 124


def test_a_chat_during_a_long_batch_waits_behind_one_window_and_a_client_that_leaves_stops_the_rest(server):
    texts = [f"Passage {i}. " + "A sentence of filler that makes each input some forty tokens long. " * 3
             for i in range(2048)]  # ~80k tokens: ~160 engine steps of 512 prefill tokens

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            batch = asyncio.create_task(http.post("/v1/embeddings", json={"model": MODEL, "input": texts}))
            while not await asyncio.to_thread(server.metric, "num_requests_running"):
                assert not batch.done(), batch.result().text
                await asyncio.sleep(0.02)
            chat = await http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
            assert chat.status_code == 200, chat.text
            # taken whole, all 2,048 inputs would have been queued ahead of the chat
            assert not batch.done()
            batch.cancel()  # the client leaves
            with pytest.raises(asyncio.CancelledError):
                await batch

    asyncio.run(main())
    wait_idle(server, within_s=5.0)  # the inputs in the engine aborted, and no more submitted
