"""One request's failure is that request's alone: the other rows of the batch go on and produce
exactly the text they produce without it."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.conftest import cpu_path_only
from tests.helpers import stream_chat


def run_to_completion(engine, requests: dict[str, tuple[list[int], SamplingParams]], poisoned: set[str] = frozenset(),
                      poison: str = "seed"):
    """Submit all at once -> (text, last output) by request. `poisoned` requests carry what no API
    request can carry any more, for a real failure inside the step: a seed the sampler refuses
    (past uint64; fails as its row is sampled), or a prompt token past the vocabulary (fails in the batched
    forward, which then runs its sequences one at a time)."""
    for rid, (prompt, params) in requests.items():
        seqs = engine.prepare_request(rid, prompt, params)
        for seq in seqs if rid in poisoned else ():
            if poison == "seed":
                seq.seed = 2**70
            else:
                seq.prompt_ids[-1] = engine.model_config.vocab_size + 5
        engine.add_sequences(seqs)
    text = {rid: "" for rid in requests}
    last = {}
    while engine.has_work:
        for out in engine.step()[0]:
            text[out.request_id] += out.text
            last[out.request_id] = out
    return text, last


@pytest.mark.parametrize("poison", ["seed", "token"])
def test_a_failing_request_fails_alone(engine, chat_prompts, poison):
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=24)
    healthy = {"greedy-0": (chat_prompts[0], greedy), "greedy-1": (chat_prompts[1], greedy),
               "seeded": (chat_prompts[2], seeded)}
    alone, alone_last = run_to_completion(engine, healthy)
    sick = {"sick-1": (chat_prompts[3], SamplingParams(temperature=1.0, max_tokens=24)),
            "sick-2": (chat_prompts[4], SamplingParams(temperature=1.0, n=2, max_tokens=24))}
    text, last = run_to_completion(engine, {**healthy, **sick}, poisoned=set(sick), poison=poison)
    for rid in healthy:
        assert text[rid] == alone[rid] and last[rid].finish_reason == alone_last[rid].finish_reason
    for rid in sick:
        assert last[rid].finish_reason == "error" and last[rid].error
    assert not engine.has_work and engine.kv_usage() == 0  # every failed row's KV was freed
    again, _ = run_to_completion(engine, healthy)
    assert again == alone  # and the engine serves on unchanged


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_token_ids_past_the_models_vocabulary_are_refused_before_the_step(engine, bad):
    """The server checks ids against the tokenizer's vocabulary; a model whose embedding has fewer
    rows than its tokenizer has tokens would index past them (on a GPU, a device-side assert ends
    every request): the engine refuses them itself, for prompts and embeddings inputs."""
    from engine.sampling_params import InvalidParamError

    token = engine.model_config.vocab_size if bad == "vocab" else bad
    with pytest.raises(InvalidParamError, match="vocabulary") as caught:
        engine.prepare_request("bad", [1, 2, token], SamplingParams(max_tokens=2))
    assert caught.value.param == "prompt"
    with pytest.raises(InvalidParamError, match="vocabulary"):
        engine.check_inputs([[1, 2], [token]])
    assert not engine.has_work


class _FailingCount(list):
    """A step's per-layer skip counts that cannot be read: a failure after the step's outputs were made."""

    def __iter__(self):
        raise RuntimeError("the step's counts could not be read")


def test_an_answer_finished_in_a_failing_step_still_comes(engine, chat_prompts, monkeypatch):
    """A request that finished in a step whose bookkeeping then failed, outside any one sequence's
    work, gets its answer; the step's unfinished requests get an error, with their KV freed. The
    step's outputs were dropped with the exception: the finished request got neither its answer nor
    an error, and its stream waited forever."""
    short = SamplingParams(temperature=0.0, max_tokens=1)
    long = SamplingParams(temperature=0.0, max_tokens=24)
    alone, alone_last = run_to_completion(engine, {"short": (chat_prompts[0], short)})
    run = engine._run
    calls = []

    def failing_once(batch):
        result = run(batch)
        if not calls:
            calls.append(batch)
            result.layer_ffn_skipped = _FailingCount(result.layer_ffn_skipped)
        return result

    monkeypatch.setattr(engine, "_run", failing_once)
    text, last = run_to_completion(engine, {"short": (chat_prompts[0], short), "long": (chat_prompts[1], long)})
    monkeypatch.undo()
    assert len(calls[0].prefills) == 2  # both in the failing step
    assert text["short"] == alone["short"] and last["short"].finish_reason == alone_last["short"].finish_reason == "length"
    assert last["long"].finish_reason == "error" and "could not be read" in last["long"].error
    assert not engine.has_work and engine.kv_usage() == 0
    assert run_to_completion(engine, {"short": (chat_prompts[0], short)})[0] == alone


def test_a_prompt_whose_logprobs_fail_gets_its_error_and_no_token(engine, chat_prompts, monkeypatch):
    """A failure in a prompt's own bookkeeping (its logprobs) fails it alone; the token sampled for
    it in the same step was still taken: it got a token output, then an error."""
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    scores = engine._prompt_scores

    def failing(seq, got):
        if seq.request_id == "sick":
            raise RuntimeError("the prompt's logprobs could not be made")
        return scores(seq, got)

    monkeypatch.setattr(engine, "_prompt_scores", failing)
    for rid, prompt in (("sick", chat_prompts[0]), ("well", chat_prompts[1])):
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=1))
    outputs = {"sick": [], "well": []}
    while engine.has_work:
        for out in engine.step()[0]:
            outputs[out.request_id].append(out)
    monkeypatch.undo()
    assert [(o.finish_reason, o.token_ids) for o in outputs["sick"]] == [("error", [])]
    assert "could not be made" in outputs["sick"][0].error
    alone, _ = run_to_completion(engine, {"well": (chat_prompts[1], greedy)})
    assert "".join(o.text for o in outputs["well"]) == alone["well"]
    assert outputs["well"][-1].finish_reason == "length"
    assert not engine.has_work and engine.kv_usage() == 0


@cpu_path_only  # compares batched text with solo text bit for bit
def test_hostile_requests_beside_streams_leave_them_unharmed(server, client):
    """Streams in flight while hostile requests arrive (out-of-range seeds, lone surrogates, bodies
    that are not objects, an oversized body) finish with the same text as alone."""
    import asyncio
    import json

    import httpx
    import openai

    model = "smollm2-135m-instruct"
    topics = ["the moon", "bread", "a river", "chess"]

    def messages(topic):
        return [{"role": "user", "content": f"Write two sentences about {topic}."}]

    solo = {t: client.chat.completions.create(model=model, messages=messages(t), max_tokens=40, temperature=0)
            .choices[0].message.content for t in topics}
    hostile = [json.dumps({"model": model, "messages": messages("x"), "temperature": 1, "seed": 2**70}),
               json.dumps({"model": model, "messages": messages("x"), "temperature": 1, "seed": 2**64 - 1, "n": 2}),
               '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % model,
               '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
               "[1, 2, 3]", "x" * (5 * 2**20)]

    async def stream(aclient, topic):
        return (await stream_chat(aclient, model=model, messages=messages(topic), max_tokens=40, temperature=0))[0]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as raw:
            streams = [asyncio.create_task(stream(aclient, t)) for t in topics]
            await asyncio.sleep(0.3)  # the streams are decoding
            codes = []
            for body in hostile:
                try:
                    r = await raw.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                    codes.append(r.status_code)
                except httpx.TransportError:  # refused (413) and closed while the client still sent the body
                    codes.append(413)
            texts = await asyncio.gather(*streams)
        await aclient.close()
        return codes, texts

    codes, texts = asyncio.run(main())
    assert codes == [400, 400, 400, 400, 400, 413]
    assert dict(zip(topics, texts)) == solo
