"""Hugging Face TGI's native API (/generate, /generate_stream, POST /, /info, /tokenize's `inputs`)
over HTTP with the real model and the real `huggingface_hub` client: an answer is the /v1/completions
answer to the same prompt written in TGI's shape (generated_text; details with each token's id, text,
logprob and `special`, the finish reason, the seed a sampled request drew, the prompt scored, top
tokens, best_of sequences), streamed one event per token with the whole text on the last."""
from __future__ import annotations

import json
import math
import re

import httpx
import huggingface_hub
import pytest
from huggingface_hub import InferenceClient

from tests.conftest import ServerProcess, cuda_available

PROMPT = "1, 2, 3, 4,"  # greedy goes on " 5, 6, 7, ..."
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(server):
    """The hub's client, for a loopback server: the engine's loader turns on huggingface_hub's
    offline mode (model files only from disk), which would refuse this client's every request."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield InferenceClient(base_url=server.url, timeout=120)


def _post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def _v1(server, **body) -> dict:
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines and "[DONE]" not in lines[-1]  # TGI's stream ends with its last token's event
    return [json.loads(line[5:]) for line in lines]


def test_the_hub_client_gets_the_completions_answer_with_the_prompt_before_it(server, client):
    v1 = _v1(server, max_tokens=8, logprobs=0, return_token_ids=True)
    whole = client.text_generation(PROMPT, max_new_tokens=8)  # POST / : the prompt first, as TGI's compat route
    alone = client.text_generation(PROMPT, max_new_tokens=8, return_full_text=False)
    assert whole == PROMPT + alone
    out = client.text_generation(PROMPT, max_new_tokens=8, details=True, return_full_text=False)
    d = out.details
    assert out.generated_text == alone and d.finish_reason == "length" and d.generated_tokens == len(d.tokens) == 8
    assert d.seed is None and d.prefill == []  # greedy; no decoder_input_details
    assert "".join(t.text for t in d.tokens) == out.generated_text and not any(t.special for t in d.tokens)
    assert all(t.logprob <= 0 for t in d.tokens)
    if not cuda_available():  # greedy answers equal across requests: the CPU path's promise
        assert alone == v1["text"] and [t.id for t in d.tokens] == v1["token_ids"]
        assert [t.logprob for t in d.tokens] == pytest.approx(v1["logprobs"]["token_logprobs"], abs=1e-4)
    r = _post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}})
    assert r.status_code == 200 and set(r.json()) == {"generated_text"}  # no details unless asked
    if not cuda_available():
        assert r.json()["generated_text"] == alone
    assert r.headers["x-prompt-tokens"] == str(len(_post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]))
    assert r.headers["x-generated-tokens"] == "8"
    compat = _post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).json()
    assert isinstance(compat, list) and len(compat) == 1 and compat[0]["generated_text"].startswith(PROMPT)


def test_a_stream_is_one_event_per_token_and_the_last_carries_the_text(server, client):
    events = _events(server, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6,
                                                                                   "details": True}})
    assert [e["index"] for e in events] == list(range(1, 7))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    prompt_ids = _post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 6
    assert last["details"]["input_length"] == len(prompt_ids) and last["details"]["seed"] is None
    assert set(last["token"]) == {"id", "text", "logprob", "special"} and "top_tokens" not in last
    texts = list(client.text_generation(PROMPT, max_new_tokens=6, stream=True))  # the hub client's token texts
    streamed = list(client.text_generation(PROMPT, max_new_tokens=6, stream=True, details=True))
    assert len(texts) == len(streamed) == 6 and streamed[-1].details.finish_reason == "length"
    assert streamed[-1].generated_text.startswith(PROMPT)  # POST /: the prompt first unless told otherwise
    if not cuda_available():
        v1 = _v1(server, max_tokens=6, logprobs=0, return_token_ids=True)
        assert "".join(texts) == last["generated_text"] == v1["text"]
        assert [e["token"]["id"] for e in events] == v1["token_ids"]
        assert [e["token"]["logprob"] for e in events] == pytest.approx(v1["logprobs"]["token_logprobs"], abs=1e-4)


def test_stop_sequences_stay_in_the_text_and_a_grammar_ends_it(server):
    r = _post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "stop": [", 7"],
                                                                      "details": True}}).json()
    if not cuda_available():
        assert r["generated_text"] == " 5, 6, 7"
    assert r["generated_text"].endswith(", 7") and r["details"]["finish_reason"] == "stop_sequence"
    events = _events(server, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 24,
                                                                                   "stop": [", 7"], "details": True}})
    assert events[-1]["generated_text"].endswith(", 7") and events[-1]["details"]["finish_reason"] == "stop_sequence"
    regex = _post(server, "/generate", {"inputs": "My PIN is", "parameters": {
        "max_new_tokens": 10, "details": True, "grammar": {"type": "regex", "value": "[0-9]{4}"}}}).json()
    assert re.fullmatch("[0-9]{4}", regex["generated_text"]) and regex["details"]["finish_reason"] == "eos_token"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for grammar in ({"type": "json", "value": schema}, {"type": "json_schema", "value": {"name": "ok", "schema": schema}}):
        answer = _post(server, "/generate", {"inputs": "Is the sky blue? Answer in JSON:", "parameters": {
            "max_new_tokens": 40, "grammar": grammar}}).json()["generated_text"]
        assert isinstance(json.loads(answer)["ok"], bool)


def test_the_end_of_text_is_a_special_token_left_out_of_the_text(server):
    (end,) = _post(server, "/tokenize", {"prompt": "<|im_end|>"}).json()["tokens"]
    chat = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n"
    events = _events(server, "/generate_stream", {"inputs": chat, "parameters": {"max_new_tokens": 64, "details": True}})
    last = events[-1]
    assert last["details"]["finish_reason"] == "eos_token" and last["token"] == dict(last["token"], id=end, special=True)
    assert last["token"]["text"] == "<|im_end|>" and "<|im_end|>" not in last["generated_text"]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events if not e["token"]["special"])


def test_a_sampled_request_reports_its_seed_and_the_seed_replays_it(server, client):
    first = client.text_generation(PROMPT, max_new_tokens=8, do_sample=True, details=True, return_full_text=False)
    seed = first.details.seed
    assert isinstance(seed, int) and seed >= 0
    again = client.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=seed, details=True,
                                   return_full_text=False)
    assert again.details.seed == seed
    if not cuda_available():
        assert again.generated_text == first.generated_text
    # a temperature alone samples, as TGI's: its seed is reported too
    assert _post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "temperature": 0.7, "details": True}}).json()["details"]["seed"] is not None


def test_best_of_keeps_the_likeliest_sequence_and_lists_the_other(server):
    r = _post(server, "/generate", {"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 8, "best_of": 2, "do_sample": True, "temperature": 1.5, "details": True}})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    (other,) = d["best_of_sequences"]

    def mean(tokens):
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert mean(d["tokens"]) >= mean(other["tokens"])
    assert {d["seed"], other["seed"]} == {min(d["seed"], other["seed"]), min(d["seed"], other["seed"]) + 1}
    assert r.json()["generated_text"] == "".join(t["text"] for t in d["tokens"] if not t["special"])
    assert other["generated_text"] == "".join(t["text"] for t in other["tokens"] if not t["special"])


def test_decoder_input_details_score_the_prompt_and_top_n_tokens_rank_each_step(server, client):
    out = client.text_generation(PROMPT, max_new_tokens=4, details=True, decoder_input_details=True, top_n_tokens=3)
    prompt_ids = _post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    prefill = out.details.prefill
    assert [t.id for t in prefill] == prompt_ids and prefill[0].logprob is None
    assert "".join(t.text for t in prefill) == PROMPT and all(t.logprob <= 0 for t in prefill[1:])
    assert len(out.details.top_tokens) == 4
    for token, top in zip(out.details.tokens, out.details.top_tokens):
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["id"] == token.id and top[0]["logprob"] == pytest.approx(token.logprob, abs=1e-5)  # greedy
    truncated = _post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 1, "truncate": 3, "decoder_input_details": True}}).json()
    assert [t["id"] for t in truncated["details"]["prefill"]] == prompt_ids[-3:]  # the prompt's last tokens


def test_a_sampled_answers_logprobs_are_of_the_distribution_it_was_drawn_from(server):
    """As TGI's, after its warpers: at temperature 0.7 with top_k 5 the first token's top tokens are
    the model's five likeliest, renormalized at that temperature, and the rest are ruled out."""
    raw = _v1(server, max_tokens=1, logprobs=5, return_tokens_as_token_ids=True)["logprobs"]["top_logprobs"][0]
    likeliest = sorted(raw.items(), key=lambda item: -item[1])
    r = _post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 1, "do_sample": True, "temperature": 0.7, "top_k": 5, "top_n_tokens": 7, "seed": 3,
        "details": True}})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    top = d["top_tokens"][0]
    scaled = [value / 0.7 for _, value in likeliest]
    norm = math.log(sum(math.exp(v) for v in scaled))
    assert [f"token_id:{t['id']}" for t in top[:5]] == [name for name, _ in likeliest]
    assert [t["logprob"] for t in top[:5]] == pytest.approx([v - norm for v in scaled], abs=1e-2)
    assert len(top) == 7 and all(t["logprob"] < -1000 for t in top[5:])
    chosen = d["tokens"][0]
    assert chosen["logprob"] == pytest.approx(next(t["logprob"] for t in top if t["id"] == chosen["id"]), abs=1e-5)


def test_the_frequency_penalty_is_tgis_a_tokens_share_of_the_whole_text(server):
    """TGI's frequency penalty subtracts penalty x (a token's count in prompt and answer / their
    length), prompt included: the first token's logprobs move apart by exactly that."""
    text = "red red red blue red red green red"
    raw = _post(server, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1, "temperature": 0,
                                            "logprobs": 8, "return_tokens_as_token_ids": True}).json()
    raw = {int(name.removeprefix("token_id:")): value
           for name, value in raw["choices"][0]["logprobs"]["top_logprobs"][0].items()}
    r = _post(server, "/generate", {"inputs": text, "parameters": {
        "max_new_tokens": 1, "frequency_penalty": 1.5, "top_n_tokens": 8, "details": True,
        "decoder_input_details": True}})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    prompt = [t["id"] for t in d["prefill"]]
    share = {t: prompt.count(t) / len(prompt) for t in raw}
    penalized = {t["id"]: t["logprob"] for t in d["top_tokens"][0] if t["id"] in raw}
    assert any(share[t] > 0 for t in penalized) and len({share[t] for t in penalized}) > 1, (share, penalized)
    first = next(iter(penalized))
    for token, value in penalized.items():
        expected = (raw[token] - 1.5 * share[token]) - (raw[first] - 1.5 * share[first])
        assert value - penalized[first] == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("body, param", [
    ({"inputs": ""}, "inputs"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 100000}}, "parameters.max_new_tokens"),
    ({"inputs": "hi", "parameters": {"temperature": 0}}, "parameters.temperature"),
    ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
    ({"inputs": "hi", "parameters": {"top_k": 0}}, "parameters.top_k"),
    ({"inputs": "hi", "parameters": {"typical_p": 1.5}}, "parameters.typical_p"),
    ({"inputs": "hi", "parameters": {"watermark": True}}, "parameters.watermark"),
    ({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "parameters.stop"),
    ({"inputs": "hi", "parameters": {"top_n_tokens": 21}}, "parameters.top_n_tokens"),
    ({"inputs": "hi", "parameters": {"truncate": 0}}, "parameters.truncate"),
    ({"inputs": "hi", "parameters": {"best_of": 2}}, "parameters.best_of"),  # greedy: nothing to choose from
    ({"inputs": "hi", "parameters": {"best_of": 3, "do_sample": True}}, "parameters.best_of"),
    ({"inputs": "hi", "parameters": {"best_of": 2, "do_sample": True, "seed": 1}}, "parameters.seed"),
    ({"inputs": "hi", "parameters": {"seed": 2**64}}, "parameters.seed"),
    ({"inputs": "hi", "parameters": {"seed": -1}}, "parameters.seed"),
    ({"inputs": "hi", "parameters": {"adapter_id": "some-lora"}}, "parameters.adapter_id"),
    ({"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": 5}}}, "parameters.grammar"),
    ({"inputs": "hi", "parameters": {"grammar": {"type": "json_object", "value": None}}}, "parameters.grammar"),
    ({"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": [1]}}}, "parameters.grammar"),
    ({"inputs": "hi", "parameters": {"grammar": {"type": "ebnf", "value": "x"}}}, "parameters.grammar.type"),
    ({"inputs": "hi", "parameters": {"frequency_penalty": 3.0}}, "parameters.frequency_penalty"),
    ({"inputs": "hi", "parameters": {"no_such": 1}}, "parameters.no_such"),
])
def test_bad_parameters_are_400s_naming_them(server, body, param):
    r = _post(server, "/generate", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert r.json()["error_type"] == "validation"  # TGI's, by which huggingface_hub raises its ValidationError
    name = param.rsplit(".", 1)[-1]
    if name not in ("inputs", "type", "grammar") and "not supported by this server" not in error["message"]:
        assert name in error["message"]  # named as TGI names it, not as /v1/completions would


def test_a_model_named_must_be_this_servers(server):
    r = _post(server, "/generate", {"inputs": PROMPT, "model": "another-model", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    ok = _post(server, "/generate", {"inputs": PROMPT, "model": MODEL, "options": {"wait_for_model": True},
                                     "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200, ok.text  # (the HF Inference API's `options` taken)
    hub = _post(server, "/generate", {"inputs": PROMPT, "model": "tgi", "parameters": {"max_new_tokens": 1}})
    assert hub.status_code == 200, hub.text  # huggingface_hub's placeholder, as chat takes it


def test_what_a_stream_cannot_carry_is_refused_before_it_starts(server, client):
    for parameters, param in (({"best_of": 2, "do_sample": True}, "best_of"),
                              ({"decoder_input_details": True}, "decoder_input_details")):
        r = _post(server, "/generate_stream", {"inputs": "hi", "parameters": parameters})
        assert r.status_code == 400 and r.json()["error"]["param"] == "parameters." + param
        r = _post(server, "/", {"inputs": "hi", "stream": True, "parameters": parameters})
        assert r.status_code == 400 and r.json()["error"]["param"] == "parameters." + param
    with pytest.raises(huggingface_hub.errors.ValidationError, match="not streamed"):  # by TGI's error_type
        list(client.text_generation("hi", stream=True, best_of=2, do_sample=True))
    with pytest.raises(huggingface_hub.errors.ValidationError, match="max_new_tokens"):
        client.text_generation("hi", max_new_tokens=0)


def test_info_invocations_and_tokenize_in_tgis_spelling(server):
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["model_id"] == MODEL and info["max_total_tokens"] == info["max_input_tokens"] + 1
    assert info["max_best_of"] == 2 and info["max_stop_sequences"] == 4 and info["max_concurrent_requests"] > 0
    # SageMaker's /invocations takes TGI's body, as TGI's container does: POST /'s answer
    r = _post(server, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2,
                                                                         "return_full_text": False}})
    assert r.status_code == 200 and isinstance(r.json(), list) and r.json()[0]["generated_text"]
    bad = _post(server, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}})
    assert bad.status_code == 400 and bad.json()["error_type"] == "validation"  # TGI's, as on its own routes
    plain = _post(server, "/invocations", {"prompt": PROMPT, "max_tokens": -1})
    assert plain.status_code == 400 and "error_type" not in plain.json()  # (an OpenAI body's errors: OpenAI's)
    events = _events(server, "/invocations", {"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 3}})
    assert [e["index"] for e in events] == [1, 2, 3] and events[-1]["generated_text"].startswith(PROMPT)
    text = "Héllo wörld 🙂!"
    tokens = _post(server, "/tokenize", {"inputs": text}).json()
    assert [t["id"] for t in tokens] == _post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    raw = text.encode()
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len(raw) > len(text)  # spans in bytes, as TGI's
    assert all(a["stop"] == b["start"] for a, b in zip(tokens, tokens[1:]))  # (this text: no token overlaps)
    (accented,) = [t for t in tokens if "é" in t["text"]]
    assert accented["stop"] - accented["start"] == len(accented["text"].encode())
    assert "".join(t["text"] for t in tokens) == text
    assert _post(server, "/tokenize", {"inputs": "hi", "prompt": "hi"}).status_code == 400
    last = _post(server, "/tokenize", {"inputs": text, "parameters": {"truncate": 3, "max_new_tokens": 5}}).json()
    assert last == tokens[-3:]  # TGI's truncate: the last tokens, their spans as they were
    for parameters, param in (({"truncate": 0}, "parameters.truncate"), ({"bogus": 1}, "parameters.bogus")):
        r = _post(server, "/tokenize", {"inputs": text, "parameters": parameters})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert r.json()["error_type"] == "validation"  # (TGI's body: TGI's error_type, as on its routes)
    assert _post(server, "/tokenize", {"prompt": text, "parameters": {}}).status_code == 400  # TGI's, with inputs


def test_chat_tokenize_gives_the_prompt_a_chat_request_is_given(server):
    """TGI's /chat_tokenize: the chat's text as the template renders it, and its tokens in
    /tokenize's TGI shape: the ids /tokenize gives for the same messages (the prompt
    /v1/chat/completions counts), each span in bytes of that text; tools shown as a chat shows them."""
    messages = [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Hi 🙂"}]
    r = _post(server, "/chat_tokenize", {"messages": messages})
    assert r.status_code == 200, r.text
    text, tokens = r.json()["templated_text"], r.json()["tokenize_response"]
    assert "Réponds en français." in text and text.rstrip().endswith("assistant")
    ids = _post(server, "/tokenize", {"messages": messages}).json()["tokens"]
    assert [t["id"] for t in tokens] == ids
    chat = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == len(ids)
    raw = text.encode()
    assert all(raw[t["start"]:t["stop"]].decode() == t["text"] for t in tokens)
    assert "".join(t["text"] for t in tokens) == text and tokens[-1]["stop"] == len(raw)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    shown = _post(server, "/chat_tokenize", {"model": "tgi", "messages": messages, "tools": [tool]}).json()
    assert "get_weather" in shown["templated_text"]
    assert [t["id"] for t in shown["tokenize_response"]] == \
        _post(server, "/tokenize", {"messages": messages, "tools": [tool]}).json()["tokens"]
    cut = _post(server, "/chat_tokenize", {"messages": messages, "truncate_prompt_tokens": 5}).json()
    assert cut["tokenize_response"] == tokens[-5:] and cut["templated_text"] == text  # (as chat cuts its prompt)
    assert _post(server, "/chat_tokenize", {"model": "no-such-model", "messages": messages}).status_code == 404
    bad = _post(server, "/chat_tokenize", {"messages": []})
    assert bad.status_code == 400 and bad.json()["error_type"] == "validation"
    assert bad.json()["error"]["param"] == "messages"


def test_the_ffn_skip_budget_rides_in_the_parameters(server):
    d = _post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 8, "details": True, "ffn_skip": {"budget": 0.3, "threshold": 0.9, "warmup_tokens": 0}}})
    skip = d.json()["details"]["ffn_skip"]
    assert skip["total"] == 30 * d.json()["details"]["generated_tokens"] and 0 < skip["skipped"] and 0 < skip["ratio"] <= 0.3
    assert math.isclose(skip["ratio"], skip["skipped"] / skip["total"])
    dense = _post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}})
    assert dense.json()["details"]["ffn_skip"]["skipped"] == 0


def test_what_langchains_tgi_example_sends_is_served(client):
    """Its settings: typical_p 0.95 beside top_p 0.95, top_k 10, a low temperature (typical sampling,
    engine/typical.py), a repetition penalty; sampled, so a seed comes back and replays it."""
    settings = dict(max_new_tokens=8, top_k=10, top_p=0.95, typical_p=0.95, temperature=0.01, repetition_penalty=1.03,
                    return_full_text=False)
    out = client.text_generation(PROMPT, details=True, **settings)
    assert out.details.generated_tokens > 0 and out.details.seed is not None
    again = client.text_generation(PROMPT, seed=out.details.seed, **settings)
    if not cuda_available():
        assert again == out.generated_text


def test_seeds_are_unsigned_64_bit_and_best_of_headers_count_the_answer(server):
    def sampled(seed):
        return _post(server, "/generate", {"inputs": PROMPT, "parameters": {
            "max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "seed": seed, "details": True}}).json()

    top = sampled(2**64 - 1)
    assert top["details"]["seed"] == 2**64 - 1
    if not cuda_available():
        assert sampled(2**64 - 1)["generated_text"] == top["generated_text"]
    r = _post(server, "/generate", {"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 4, "best_of": 2, "do_sample": True, "stop": ["\u00a7"]}})
    assert r.status_code == 200 and r.headers["x-generated-tokens"] == "4"  # the answer's, not both sequences'


def test_a_request_without_parameters_samples_as_tgi_fills_them_in():
    from server.tgi_protocol import GenerateRequest

    assert GenerateRequest.model_validate({"inputs": "x"}).parameters.sampling  # TGI's default: do_sample true
    assert not GenerateRequest.model_validate({"inputs": "x", "parameters": {}}).parameters.sampling
    assert not GenerateRequest.model_validate({"inputs": "x", "parameters": {"temperature": 1.0}}).parameters.sampling
    assert GenerateRequest.model_validate({"inputs": "x", "parameters": {"typical_p": 0.9}}).parameters.sampling


def test_the_hub_clients_chat_is_served_by_v1_chat_completions(server, client):
    """huggingface_hub's chat_completion against a server URL: it names the model "dummy" (TGI reads
    no name) and sends a JSON schema in TGI's form ({"type": "json_object", "value": schema})."""
    messages = [{"role": "user", "content": "Name a colour."}]
    out = client.chat_completion(messages, max_tokens=8, temperature=0)
    assert out.model == MODEL and out.choices[0].message.content and out.choices[0].finish_reason
    chunks = list(client.chat_completion(messages, max_tokens=8, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if not cuda_available():
        assert streamed == out.choices[0].message.content
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    held = client.chat_completion([{"role": "user", "content": "Is the sky blue? Answer in JSON."}], max_tokens=40,
                                  response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}})
    assert isinstance(json.loads(held.choices[0].message.content)["ok"], bool)
    regex = _post(server, "/v1/chat/completions", {"model": "tgi", "messages": messages, "max_tokens": 10,
                                                   "response_format": {"type": "regex", "value": "[0-9]{3}"}})
    assert regex.status_code == 200 and re.fullmatch("[0-9]{3}", regex.json()["choices"][0]["message"]["content"])
    for bad in ({"type": "json", "value": 5}, {"type": "regex", "value": {"a": 1}}, {"type": "regex"},
                {"type": "json_schema", "value": {"name": "x"}}):
        r = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "response_format": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", (bad, r.text)
    assert _post(server, "/v1/chat/completions", {"model": "no-such-model", "messages": messages}).status_code == 404
    assert httpx.get(server.url + "/v1/models/dummy").status_code == 404  # a placeholder on chat only, not a model


def test_max_input_tokens_caps_a_generating_requests_prompt():
    """TGI's --max-input-tokens (and its older --max-input-length): a longer prompt is a 400 naming
    it on every generating route, /info reports the cap, a prompt within it is served."""
    srv = ServerProcess("--max-input-length", "12", "--max-total-tokens", "256", "--max-batch-size", "2")
    try:
        long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
        r = _post(srv, "/generate", {"inputs": long, "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "inputs"
        assert r.json()["error"]["code"] == "context_length_exceeded" and "--max-input-tokens 12" in r.text
        assert r.json()["error"]["message"].startswith("`inputs` holds 14 tokens")  # (it read "the inputs is")
        chat = _post(srv, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"  # the template's tokens count
        ok = _post(srv, "/v1/completions", {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        cut = _post(srv, "/generate", {"inputs": long, "parameters": {"max_new_tokens": 2, "truncate": 12}})
        assert cut.status_code == 200, cut.text  # truncated to the cap first, as TGI's truncate serves it
        over = _post(srv, "/generate", {"inputs": long, "parameters": {"max_new_tokens": 2, "truncate": 13}})
        assert over.status_code == 400 and over.json()["error"]["param"] == "parameters.truncate", over.text
        info = httpx.get(srv.url + "/info", timeout=30).json()
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (12, 256)
    finally:
        srv.stop()
