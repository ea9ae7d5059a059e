"""vLLM's `return_token_ids` on /v1/chat/completions and /v1/completions, over HTTP with the real
model: the prompt's token ids (chat: beside the choices, as the template rendered them; completions:
in each choice, its own prompt's) and each choice's answer as token ids, every token the answer
made (`usage` counts them); streamed, each chunk carries the tokens made since the choice's last
chunk and the first chunk the prompt's, so that the chunks' ids joined are the answer's."""
from __future__ import annotations

import json

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=dict(body, model=MODEL), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(server, path: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", server.url + path, json=dict(body, model=MODEL, stream=True), timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def _tokens(server, **body) -> list[int]:
    return _post(server, "/tokenize", body)["tokens"]


def _text(server, ids: list[int]) -> str:
    """The ids' text as an answer shows it (special tokens left out)."""
    ordinary = [i for i in ids if i not in _specials(server)]
    return _post(server, "/detokenize", {"tokens": ordinary})["prompt"] if ordinary else ""


_SPECIALS: set[int] = set()


def _specials(server) -> set[int]:
    if not _SPECIALS:  # the vocabulary's special tokens the embedded model ends answers with
        for t in ("<|im_end|>", "<|endoftext|>"):
            _SPECIALS.update(_tokens(server, prompt=t, add_special_tokens=False))
    return _SPECIALS


def test_chat_gives_the_rendered_prompts_ids_and_the_answers(server):
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0,
                                               "return_token_ids": True})
    assert r["prompt_token_ids"] == _tokens(server, messages=MESSAGES)
    choice = r["choices"][0]
    assert len(choice["token_ids"]) == r["usage"]["completion_tokens"] > 0
    assert _text(server, choice["token_ids"]) == choice["message"]["content"]
    plain = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]  # only when asked


def test_an_answer_that_ends_keeps_its_last_token_and_a_stop_strings_tokens(server):
    ended = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 200, "temperature": 0,
                                                   "return_token_ids": True})["choices"][0]
    assert ended["finish_reason"] == "stop"
    assert ended["token_ids"][-1] in _specials(server)  # the end of turn, counted and shown, as vLLM shows it
    assert len(ended["message"]["content"].split()) > 2
    stop = " "  # (an answer of words meets it on any device)
    cut = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 200, "temperature": 0,
                                                 "stop": [stop], "return_token_ids": True})
    c = cut["choices"][0]
    assert c["finish_reason"] == "stop" and stop not in c["message"]["content"]
    assert len(c["token_ids"]) == cut["usage"]["completion_tokens"]
    made = _text(server, c["token_ids"])  # the text ends before the stop string; the tokens do not
    assert stop in made and made[:made.index(stop)] == c["message"]["content"]


@pytest.mark.parametrize("tools", [False, True])
def test_chat_stream_carries_the_prompt_first_and_each_chunks_new_tokens(server, tools):
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "n": 2, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    if tools:  # an answer that may be a call is held back: its tokens go with the chunk that sends it
        body["tools"] = [{"type": "function", "function": {"name": "paint", "parameters": {"type": "object"}}}]
    chunks = _stream(server, "/v1/chat/completions", body)
    prompt = _tokens(server, messages=MESSAGES, **({"tools": body["tools"]} if tools else {}))
    usage = chunks[-1]["usage"]
    made = 0
    for index in (0, 1):
        mine = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["prompt_token_ids"] == prompt
        assert all("prompt_token_ids" not in c for c in mine[1:])
        ids = [t for c in mine for t in c["choices"][0]["token_ids"]]
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in mine)
        calls = [call for c in mine for call in c["choices"][0]["delta"].get("tool_calls") or []]
        assert ids and (calls or _text(server, ids) == content)
        made += len(ids)
    assert made == usage["completion_tokens"]


def test_completions_give_each_choice_its_prompts_ids_and_its_answer(server):
    prompts = ["The capital of France is", "One, two, three,"]
    r = _post(server, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0.8,
                                          "seed": 3, "ignore_eos": True, "return_token_ids": True})
    assert len(r["choices"]) == 4
    for choice in r["choices"]:
        assert choice["prompt_token_ids"] == _tokens(server, prompt=prompts[choice["index"] // 2])
        assert len(choice["token_ids"]) == 6
        assert _text(server, choice["token_ids"]) == choice["text"]
    assert sum(len(c["token_ids"]) for c in r["choices"]) == r["usage"]["completion_tokens"]
    given = _tokens(server, prompt=prompts[0])  # token ids in, the same ids out
    again = _post(server, "/v1/completions", {"prompt": given, "max_tokens": 1, "return_token_ids": True})
    assert again["choices"][0]["prompt_token_ids"] == given


def test_completions_stream_each_choices_prompt_first_then_its_tokens(server):
    prompts = ["The capital of France is", "One, two, three,"]
    chunks = _stream(server, "/v1/completions", {"prompt": prompts, "max_tokens": 8, "temperature": 0,
                                                  "ignore_eos": True, "echo": True, "return_token_ids": True})
    for index, prompt in enumerate(prompts):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["prompt_token_ids"] == _tokens(server, prompt=prompt)
        assert all("prompt_token_ids" not in c for c in mine[1:])
        ids = [t for c in mine for t in c["token_ids"]]
        assert len(ids) == 8
        assert prompt + _text(server, ids) == "".join(c["text"] for c in mine)  # echo: the prompt, then the answer


def test_echo_of_the_prompt_alone_makes_no_tokens(server):
    r = _post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 0, "echo": True,
                                          "return_token_ids": True})
    choice = r["choices"][0]
    assert choice["token_ids"] == [] and choice["prompt_token_ids"] == _tokens(server, prompt="Hello there")


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "Hi"}),
])
def test_a_return_token_ids_that_is_not_a_boolean_is_a_400(server, path, body):
    r = httpx.post(server.url + path, json=dict(body, model=MODEL, return_token_ids="yes"), timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "return_token_ids"
