"""llama.cpp's native API (/completion, /apply-template) over HTTP with the real model: a /completion
answer is the /v1/completions answer to the same prompt, written as llama-server writes it
(content, tokens, stop_type, stopping_word, timings, completion_probabilities), streamed as
{"content", "stop"} chunks with no [DONE]; llama.cpp's defaults apply, and samplers this engine does
not have are taken only switched off."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import cuda_available

PROMPT = "1, 2, 3, 4,"  # greedy goes on " 5, 6, 7, ..."


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def _tokens(server, text: str) -> list[int]:
    return _post(server, "/tokenize", {"prompt": text}).json()["tokens"]


def _text(server, ids: list[int]) -> str:
    return _post(server, "/detokenize", {"tokens": ids}).json()["prompt"]


def _stream(server, body: dict) -> list[str]:
    with httpx.stream("POST", server.url + "/completion", json=dict(body, stream=True), timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_a_completion_is_the_v1_answer_in_llama_cpps_shape(server):
    r = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True})
    assert r.status_code == 200, r.text
    a = r.json()
    prompt = _tokens(server, PROMPT)
    assert a["stop"] is True and a["stop_type"] == "limit" and a["stopping_word"] == ""
    assert a["tokens_predicted"] == len(a["tokens"]) == 8 and a["tokens_evaluated"] == len(prompt)
    assert _text(server, a["tokens"]) == a["content"]
    assert a["timings"]["predicted_n"] == 8 and a["timings"]["predicted_ms"] > 0
    assert a["generation_settings"]["n_predict"] == 8 and a["generation_settings"]["temperature"] == 0.0
    v1 = _post(server, "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": PROMPT, "max_tokens": 8,
                                           "temperature": 0}).json()
    if not cuda_available():  # greedy text equal across requests: the CPU path's promise
        assert a["content"] == v1["choices"][0]["text"]
    plain = _post(server, "/completion", {"prompt": prompt, "n_predict": 2}).json()  # token ids in; llama.cpp's defaults
    assert plain["tokens"] == [] and plain["tokens_evaluated"] == len(prompt)
    settings = plain["generation_settings"]
    assert (settings["temperature"], settings["top_k"], settings["top_p"], settings["min_p"]) == (0.8, 40, 0.95, 0.05)


def test_the_temperature_scales_what_the_filters_kept_as_in_llama_cpps_chain(server):
    """llama.cpp's chain cuts, then scales: top_p 0.5 keeps the likeliest token alone where it holds
    half the mass at temperature 1 (each of the counting's next tokens does) and a temperature of 2
    after it changes nothing: every seed writes the greedy text. A `samplers` order with the
    temperature before top_p (a list of names, or llama.cpp's letters) scales first, as vLLM: flattened,
    the nucleus holds many tokens."""
    greedy = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 10, "temperature": 0}).json()["content"]
    hot = {"prompt": PROMPT, "n_predict": 10, "temperature": 2.0, "top_k": 0, "top_p": 0.5, "min_p": 0.0}
    last = [_post(server, "/completion", dict(hot, seed=seed, **order)).json()["content"]
            for seed, order in ((1, {}), (2, {"samplers": ["top_k", "top_p", "min_p", "temperature"]}),
                                (3, {"samplers": "kpmt"}))]
    first = [_post(server, "/completion", dict(hot, seed=seed, samplers=order)).json()["content"]
             for seed, order in ((1, ["top_k", "temperature", "top_p", "min_p"]), (2, "ktpm"))]
    if not cuda_available():  # the CPU path's greedy text
        assert last == [greedy] * 3
    assert greedy not in first and first[0] != first[1]
    settings = [_post(server, "/completion", dict(hot, n_predict=1, **order)).json()["generation_settings"]["samplers"]
                for order in ({}, {"samplers": "ktpm"})]  # the order applied, named as llama.cpp names it
    assert settings[0][-1] == "temperature" and settings[1].index("temperature") < settings[1].index("top_p")
    r = _post(server, "/completion", dict(hot, samplers=[1]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "samplers.0"


def test_samplers_the_chain_leaves_out_do_not_apply(server):
    """As llama-server builds its chain from `samplers`: top_k 1 keeps the likeliest token alone where
    the chain holds top_k (every seed writes the greedy text, at any temperature, or with none in the
    chain: the draw at temperature 1 from one token), and nothing where it is left out."""
    greedy = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 10, "temperature": 0}).json()["content"]
    hot = {"prompt": PROMPT, "n_predict": 10, "temperature": 2.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0}
    kept = [_post(server, "/completion", dict(hot, seed=seed, samplers=order)).json()["content"]
            for seed, order in ((1, ["top_k", "temperature"]), (2, "kt"), (3, ["top_k"]))]
    dropped = [_post(server, "/completion", dict(hot, seed=seed, samplers=order)).json()["content"]
               for seed, order in ((1, ["temperature", "top_p"]), (2, "tpm"))]
    if not cuda_available():
        assert kept == [greedy] * 3
    assert greedy not in dropped and dropped[0] != dropped[1]
    orders = (["top_k"], "ekt", ["dry", "temp", "min-p"], ["topk", "minp"])
    settings = [_post(server, "/completion", dict(hot, n_predict=1, samplers=order, presence_penalty=0.5))
                .json()["generation_settings"] for order in orders]
    assert [s["samplers"] for s in settings] == [["top_k"], ["penalties", "top_k", "temperature"],
                                                 ["temperature", "min_p"], ["top_k", "min_p"]]
    # the settings applied: a sampler left out reads as its off value (the temperature's 1)
    assert [(s["presence_penalty"], s["temperature"]) for s in settings] == [(0.0, 1.0), (0.5, 2.0), (0.0, 2.0),
                                                                             (0.0, 1.0)]


def test_seeds_are_read_as_llama_cpp_reads_them(server):
    """A 32-bit unsigned value (-2 is 4294967294, a fixed seed), -1 (4294967295) and none: a new one each time."""
    answers = [_post(server, "/completion", {"prompt": PROMPT, "n_predict": 12, "temperature": 1.0, **seed}).json()
               for seed in ({"seed": -2}, {"seed": 2**32 - 2}, {"seed": -1}, {})]
    assert [a["generation_settings"]["seed"] for a in answers] == [2**32 - 2, 2**32 - 2, 2**32 - 1, 2**32 - 1]
    if not cuda_available():  # sampled text equal across requests: the CPU path's promise
        assert answers[0]["content"] == answers[1]["content"]


def test_stop_types_name_the_word_or_the_end_of_text(server):
    word = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 16, "temperature": 0, "stop": [", 7"]}).json()
    assert word["stop_type"] == "word" and word["stopping_word"] == ", 7" and ", 7" not in word["content"]
    (end,) = _tokens(server, "<|im_end|>")  # the model's end of text, forced first
    eos = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 16, "logit_bias": [[end, 100]]}).json()
    assert eos["stop_type"] == "eos" and eos["content"] == "" and eos["tokens_predicted"] == 1
    (five,) = _tokens(server, "5")  # greedy's next digit, banned
    banned = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 4, "temperature": 0, "return_tokens": True,
                                           "logit_bias": [[five, False]]}).json()
    assert five not in banned["tokens"] and banned["tokens_predicted"] == 4


def test_streamed_chunks_carry_the_text_then_one_final_object(server):
    lines = _stream(server, {"prompt": PROMPT, "n_predict": 8, "temperature": 0})
    assert "[DONE]" not in lines
    chunks = [json.loads(line) for line in lines]
    *pieces, last = chunks
    assert all(p["stop"] is False for p in pieces) and last["stop"] is True and last["stop_type"] == "limit"
    assert last["tokens_predicted"] == 8 and last["content"] == ""
    ids = [t for p in pieces for t in p["tokens"]]
    assert len(ids) == 8 and _text(server, ids) == "".join(p["content"] for p in pieces)


@pytest.mark.parametrize("stream", [False, True])
def test_has_new_line_says_whether_the_answer_held_one(server, stream):
    for prompt, new_line in (("Shopping list:\n- milk\n- eggs\n-", True), (PROMPT, False)):  # greedy: " cheese\n- ..."
        body = {"prompt": prompt, "n_predict": 12, "temperature": 0}
        if stream:
            *pieces, last = map(json.loads, _stream(server, body))
            content = "".join(p["content"] for p in pieces)
        else:
            last = _post(server, "/completion", body).json()
            content = last["content"]
        assert last["has_new_line"] == ("\n" in content), (content, last["has_new_line"])
        if not cuda_available():  # the CPU path's greedy text
            assert last["has_new_line"] is new_line, content


def test_truncated_says_the_context_ended_the_answer(server):
    """llama.cpp's `truncated`: the answer reached the context's end, whatever else stopped it there
    (an n_predict of exactly the room left too, as llama.cpp tests the context first)."""
    n_ctx = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 1}).json()["generation_settings"]["n_ctx"]
    prompt = _tokens(server, PROMPT * 2)
    prompt = (prompt * (n_ctx // len(prompt) + 1))[:n_ctx - 5]  # room for 5 tokens
    answers = [_post(server, "/completion", {"prompt": prompt, "ignore_eos": True, "temperature": 0, **n}).json()
               for n in ({}, {"n_predict": -1}, {"n_predict": 3}, {"n_predict": 5})]
    assert [(a["tokens_predicted"], a["stop_type"], a["truncated"]) for a in answers] == [
        (5, "limit", True), (5, "limit", True), (3, "limit", False), (5, "limit", True)]
    assert answers[0]["tokens_evaluated"] + answers[0]["tokens_predicted"] == n_ctx


@pytest.mark.parametrize("stream", [False, True])
def test_n_probs_gives_each_tokens_likeliest(server, stream):
    body = {"prompt": PROMPT, "n_predict": 4, "temperature": 0, "n_probs": 3, "return_tokens": True}
    if stream:
        pieces = [json.loads(line) for line in _stream(server, body)][:-1]
        probs = [p for piece in pieces for p in piece["completion_probabilities"]]
        tokens = [t for piece in pieces for t in piece["tokens"]]
    else:
        a = _post(server, "/completion", body).json()
        probs, tokens = a["completion_probabilities"], a["tokens"]
    assert [p["id"] for p in probs] == tokens and len(tokens) == 4
    for p in probs:
        assert len(p["top_logprobs"]) == 3 and p["top_logprobs"][0]["id"] == p["id"]  # greedy: the likeliest
        assert bytes(p["bytes"]).decode() == p["token"] and p["logprob"] <= 0


def test_llama_cpps_other_names_are_taken(server):
    a = _post(server, "/completion", {"prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "temperature": 0}).json()
    assert a["tokens_predicted"] == 3 and len(a["completion_probabilities"]) == 3
    assert len(a["completion_probabilities"][0]["top_logprobs"]) == 2
    held = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 6, "grammar": 'root ::= " 9" [0-9]*',
                                         "json_schema": {"type": "object"}}).json()
    assert held["content"].startswith(" 9")  # the grammar, not the schema, holds it (llama.cpp's rule)


def test_n_predict_0_computes_the_prompt_alone(server):
    a = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 0}).json()
    assert a["content"] == "" and a["tokens_predicted"] == 0 and a["tokens_evaluated"] == len(_tokens(server, PROMPT))


@pytest.mark.parametrize("body, status, param", [
    ({"mirostat": 2}, 400, "mirostat"),
    ({"typical_p": 0.5}, 200, None),  # typical sampling (engine/typical.py)
    ({"typical_p": 0.0}, 400, "typical_p"),
    ({"logit_bias": [["Hello", 1.0]]}, 400, "logit_bias"),
    ({"n_probs": 25}, 400, "n_probs"),
    ({"repeat_penalty": 3.0}, 400, "repeat_penalty"),
    ({"n_predict": 4, "frobnicate": 1}, 400, "frobnicate"),
    ({"mirostat": 0, "typical_p": 1.0, "cache_prompt": True, "id_slot": -1, "samplers": ["top_k"], "n_keep": -1,
      "top_n_sigma": -1, "grammar": "", "xtc_probability": None}, 200, None),
])
def test_llama_cpp_fields_are_taken_switched_off_or_refused_by_name(server, body, status, param):
    r = _post(server, "/completion", {"prompt": PROMPT, "n_predict": 1, **body})
    assert r.status_code == status, r.text
    if param:
        assert r.json()["error"]["param"] == param
        assert param in r.json()["error"]["message"]  # (not the /v1/completions field it is served as)


def test_apply_template_gives_the_chat_prompts_text(server):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = _post(server, "/apply-template", {"messages": messages})
    assert r.status_code == 200, r.text
    ids = _post(server, "/tokenize", {"messages": messages}).json()["tokens"]
    assert r.json()["prompt"] == _text(server, ids) and r.json()["prompt"].startswith("<|im_start|>")
    # llama.cpp's workflow: the text, edited or not, sent to /completion is the chat prompt again
    again = _post(server, "/completion", {"prompt": r.json()["prompt"], "n_predict": 1, "return_tokens": True}).json()
    assert again["tokens_evaluated"] == len(ids)


def test_tokenize_and_detokenize_in_llama_cpps_spelling(server):
    r = _post(server, "/tokenize", {"content": "Hello wörld", "with_pieces": True})
    assert r.status_code == 200, r.text
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == _post(server, "/tokenize", {"prompt": "Hello wörld",
                                                                   "add_special_tokens": False}).json()["tokens"]
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == "Hello wörld"  # (a piece that is no whole UTF-8 comes as its bytes)
    ids = _post(server, "/tokenize", {"content": "Hello", "add_special": True}).json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    back = _post(server, "/detokenize", {"tokens": ids}).json()
    assert back["content"] == back["prompt"] and back["content"].endswith("Hello")
    for bad, param in (({"content": "x", "parse_special": False}, "parse_special"),
                       ({"content": "x", "prompt": "y"}, "content")):
        r = _post(server, "/tokenize", bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_props_describe_the_context_defaults_and_template(server):
    p = httpx.get(server.url + "/props", timeout=30).json()
    assert p["default_generation_settings"]["n_ctx"] == 2048 and p["total_slots"] >= 1
    assert p["default_generation_settings"]["params"]["temperature"] == 0.8
    assert "<|im_start|>" in p["chat_template"] and p["model_alias"] == "smollm2-135m-instruct"


def test_infill_needs_a_model_with_fim_tokens(server):
    """The embedded model has none: a 400 naming the field (tests/test_architectures.py fills a gap
    through a file's FIM tokens)."""
    r = _post(server, "/infill", {"input_prefix": "def f():", "input_suffix": "\n", "n_predict": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_prefix"
