"""`--reasoning-parser`: a chat answer's thinking as `reasoning_content`, apart from its content,
streamed or not. The embedded model does not think on its own; an assistant message left open
(`continue_final_message`) with a pattern of `<think>...</think>` lines makes it write the rest of
a thinking block, a `</think>` and more: an answer whose thinking the prompt opened, as Qwen3's
thinking-only templates open it (the qwen3 parser reads the prompt's end for that). The raw text
comes from /v1/completions on the same prompt's token ids."""
from __future__ import annotations

import json
import random

import httpx
import pytest

from server.reasoning import ReasoningSplit, prompt_opens_thinking
from tests.conftest import MODEL, ServerProcess

TEXTS = ["<think>\nHmm, let me see.\n</think>\n\nParis.", "Paris.", "  <think>a</think>b", "<think>unfinished",
         "<thi", "<think></think>", "x</think>y", "<think>a</thi", "\n\n", "<think>a<think>b</think></think>c", ""]


@pytest.mark.parametrize("parser,opened", [("qwen3", False), ("qwen3", True), ("deepseek_r1", False)])
def test_any_split_of_the_stream_gives_the_whole_answers_split(parser, opened):
    """Fed in random pieces (tags cut anywhere), the split is the finished answer's."""
    for text in TEXTS:
        whole = ReasoningSplit.whole(parser, text, opened)
        for seed in range(40):
            rng, split, got = random.Random(seed), ReasoningSplit(parser, opened), ["", ""]
            at = 0
            while at < len(text):
                end = min(len(text), at + rng.randint(1, 4))
                for i, piece in enumerate(split.feed(text[at:end])):
                    got[i] += piece
                at = end
            for i, piece in enumerate(split.feed("", final=True)):
                got[i] += piece
            assert (got[0], got[1]) == (whole[0] or "", whole[1]), (text, seed)


def test_reasoning_tokens_run_to_the_token_that_closes_the_thinking():
    pieces = ["<th", "ink>", "plan", " more", "</", "think", ">\n", "Answer", "."]
    split = ReasoningSplit("qwen3")
    counts = []
    for piece in pieces:
        split.feed(piece, tokens=1)
        counts.append(split.reasoning_tokens)
    assert counts == [0, 2, 3, 4, 5, 6, 7, 7, 7]  # the tag's tokens count; nothing after "</think>"
    plain = ReasoningSplit("qwen3")
    for piece in ["An", "swer", "."]:
        plain.feed(piece, tokens=1)
    assert plain.reasoning_tokens == 0 and not plain.thought
    cut = ReasoningSplit("deepseek_r1")
    cut.feed("still", tokens=1)
    cut.feed(" thinking", final=True, tokens=1)
    assert cut.reasoning_tokens == 2 and cut.closed_at is None


def closing_token(tokens: list[str]) -> int:
    """How many of an answer's tokens (their texts) it takes to write its first `</think>`."""
    text = ""
    for i, token in enumerate(tokens):
        text += token
        if "</think>" in text:
            return i + 1
    raise AssertionError(f"no </think> in {text!r}")


def test_the_parsers_rules():
    q, d = "qwen3", "deepseek_r1"
    assert ReasoningSplit.whole(q, "<think>\nplan\n</think>\n\nAnswer.") == ("\nplan\n", "Answer.")
    assert ReasoningSplit.whole(q, "Answer.") == (None, "Answer.")  # thinking off: all content
    assert ReasoningSplit.whole(q, "<think>cut off") == ("cut off", "")  # max_tokens while thinking
    assert ReasoningSplit.whole(q, "a</think>b") == (None, "a</think>b")  # never opened
    assert ReasoningSplit.whole(d, "plan</think>Answer.") == ("plan", "Answer.")  # the prompt opened it
    assert ReasoningSplit.whole(d, "<think>plan</think>Answer.") == ("plan", "Answer.")
    assert ReasoningSplit.whole(d, "still thinking") == ("still thinking", "")
    # a prompt that ends inside <think> (Qwen3's thinking-only templates): thinking from the first token
    assert ReasoningSplit.whole(q, " 10</think>10", opened=True) == (" 10", "10")
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<think>\n\n</think>\n\n") and not prompt_opens_thinking("assistant\n")
    with pytest.raises(ValueError):
        ReasoningSplit("gpt")


# SmolLM2's template without its default system prompt, whose generation prompt opens a thinking
# block and which writes an assistant message's reasoning_content before its content, as the
# templates of Qwen3's thinking models do
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message.reasoning_content %}{{ '<think>' + message.reasoning_content + '</think>' }}{% endif %}"
            "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "thinking.jinja"
    template.write_text(TEMPLATE)
    # on the CPU path on any host: answers are compared with /v1/completions' text on the same prompt,
    # which CUDA's bf16 kernels need not reproduce when the prompt comes from the prefix cache
    srv = ServerProcess("--reasoning-parser", "qwen3", "--max-num-seqs", "4", "--chat-template", str(template),
                        "--device", "cpu")
    yield srv
    srv.stop()


PATTERN = [{"role": "user", "content": "Add the numbers, thinking first."},
           {"role": "assistant", "content": "<think>2 + 2 = 4</think>4\n<think>3 + 3 = 6</think>6\n"
                                            "<think>1 + 1 = 2</think>2\n<think>5 + 5 ="}]
OPEN = {"continue_final_message": True, "add_generation_prompt": False}


def post(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_chat_answers_split_thinking_from_content_streamed_or_not(thinking_server):
    body = {"model": MODEL, "messages": PATTERN, "max_tokens": 24, "temperature": 0, **OPEN}
    tokens = post(thinking_server, "/tokenize", {"messages": PATTERN, **OPEN}).json()["tokens"]
    completion = post(thinking_server, "/v1/completions", {"model": MODEL, "prompt": tokens, "max_tokens": 24,
                                                           "temperature": 0, "logprobs": 0}).json()["choices"][0]
    raw = completion["text"]
    assert "</think>" in raw and raw.split("</think>", 1)[1].strip()  # the model closed its thinking
    reasoning, content = ReasoningSplit.whole("qwen3", raw, opened=True)  # the prompt ends inside <think>
    assert reasoning and reasoning.strip() and "</think>" not in reasoning
    thinking_tokens = closing_token(completion["logprobs"]["tokens"])
    assert thinking_tokens < len(completion["logprobs"]["tokens"])

    answer = post(thinking_server, "/v1/chat/completions", body).json()
    message = answer["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": thinking_tokens}
    assert "</think>" not in message["reasoning_content"] and not message["content"].startswith((" ", "\n"))

    streamed = {"reasoning_content": "", "content": ""}
    order, logprobs = [], 0
    with httpx.stream("POST", thinking_server.url + "/v1/chat/completions",
                      json={**body, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}},
                      timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
                assert chunk["usage"]["completion_tokens_details"] == {"reasoning_tokens": thinking_tokens}
            for choice in chunk["choices"]:
                for key in streamed:
                    if choice["delta"].get(key):
                        streamed[key] += choice["delta"][key]
                        order.append(key)
                logprobs += len((choice.get("logprobs") or {}).get("content") or [])
    assert streamed == {"reasoning_content": reasoning, "content": content}
    assert order == sorted(order, key=["reasoning_content", "content"].index)  # thinking first, then content
    assert logprobs == completion_tokens  # every token's logprob went out, held ones too


def test_include_reasoning_false_leaves_the_thinking_out(thinking_server):
    """vLLM's `include_reasoning: false`: the content alone, streamed or not; the thinking's tokens
    still counted, and their logprobs go out with the content's."""
    body = {"model": MODEL, "messages": PATTERN, "max_tokens": 24, "temperature": 0, **OPEN}
    shown = post(thinking_server, "/v1/chat/completions", body).json()
    hidden = post(thinking_server, "/v1/chat/completions", {**body, "include_reasoning": False}).json()
    assert shown["choices"][0]["message"]["reasoning_content"]  # (the model thinks here)
    assert hidden["choices"][0]["message"]["reasoning_content"] is None
    assert hidden["choices"][0]["message"]["content"] == shown["choices"][0]["message"]["content"]
    assert hidden["usage"] == shown["usage"]
    content, logprobs = "", 0
    with httpx.stream("POST", thinking_server.url + "/v1/chat/completions", timeout=120,
                      json={**body, "include_reasoning": False, "stream": True, "logprobs": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in httpx.Response(200, content=line[6:]).json()["choices"]:
                    assert "reasoning_content" not in choice["delta"]
                    content += choice["delta"].get("content") or ""
                    logprobs += len((choice.get("logprobs") or {}).get("content") or [])
    assert content == shown["choices"][0]["message"]["content"]
    assert logprobs == shown["usage"]["completion_tokens"]


def test_an_answer_goes_back_into_the_history_with_its_reasoning(thinking_server):
    """The SDK's way to go on with a conversation: the response's message appended as it is, its
    reasoning_content included (and vLLM's `reasoning` name), then a new user turn."""
    import openai

    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    first = client.chat.completions.create(model=MODEL, messages=PATTERN, max_tokens=12, temperature=0,
                                           extra_body=OPEN)
    message = first.choices[0].message
    assert message.model_extra["reasoning_content"]
    history = [PATTERN[0], message, {"role": "user", "content": "And 7 + 7?"}]
    again = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4, temperature=0)
    assert again.choices[0].message.content is not None
    renamed = [PATTERN[0], {"role": "assistant", "content": message.content, "reasoning": "5 + 5 = 10"},
               {"role": "user", "content": "And 7 + 7?"}]
    post(thinking_server, "/v1/chat/completions", {"model": MODEL, "messages": renamed, "max_tokens": 2})
    r = httpx.post(thinking_server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi", "reasoning_content": "no"}]})
    assert r.status_code == 400 and "only assistant messages" in r.json()["error"]["message"]


def test_a_grammar_holds_the_content_after_the_thinking(thinking_server):
    """response_format with a reasoning parser: the thinking is free (the same text as the raw
    completion's up to </think>), the content after it is the grammar's JSON, streamed or not."""
    tokens = post(thinking_server, "/tokenize", {"messages": PATTERN, **OPEN}).json()["tokens"]
    raw = post(thinking_server, "/v1/completions", {"model": MODEL, "prompt": tokens, "max_tokens": 24,
                                                    "temperature": 0}).json()["choices"][0]["text"]
    reasoning, content = ReasoningSplit.whole("qwen3", raw, opened=True)
    assert not content.startswith("{")  # unconstrained, the model does not answer in JSON
    body = {"model": MODEL, "messages": PATTERN, "max_tokens": 40, "temperature": 0, **OPEN,
            "response_format": {"type": "json_object"}}
    answer = post(thinking_server, "/v1/chat/completions", body).json()
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] == reasoning
    if answer["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(message["content"]), dict)
    else:  # cut off inside the document
        assert message["content"].startswith("{")
    streamed = {"reasoning_content": "", "content": ""}
    with httpx.stream("POST", thinking_server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in httpx.Response(200, content=line[6:]).json()["choices"]:
                    for key in streamed:
                        streamed[key] += choice["delta"].get(key) or ""
    assert streamed == {"reasoning_content": message["reasoning_content"], "content": message["content"]}


def test_a_named_call_cut_off_while_thinking_is_no_call(thinking_server):
    """A forced call that max_tokens cuts off comes back as a call once its JSON has begun; cut off
    while the answer still thinks, there is no call to return, only the thinking."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    body = {"model": MODEL, "messages": PATTERN, "max_tokens": 2, "temperature": 0, **OPEN, "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "add"}}}
    for stream in (False, True):
        if not stream:
            choice = post(thinking_server, "/v1/chat/completions", body).json()["choices"][0]
            message, reason = choice["message"], choice["finish_reason"]
        else:
            message, reason = {"reasoning_content": "", "tool_calls": []}, None
            with httpx.stream("POST", thinking_server.url + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        for c in httpx.Response(200, content=line[6:]).json()["choices"]:
                            message["reasoning_content"] += c["delta"].get("reasoning_content") or ""
                            message["tool_calls"] += c["delta"].get("tool_calls") or []
                            reason = c["finish_reason"] or reason
        assert reason == "length" and message["reasoning_content"] and not message.get("tool_calls")


TURNS = [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "<think>2 + 2 = 4</think>4"},
         {"role": "user", "content": "Add 3 and 3."}, {"role": "assistant", "content": "<think>3 + 3 = 6</think>6"},
         {"role": "user", "content": "Add 5 and 5."}]


def test_responses_put_the_thinking_in_a_reasoning_item_streamed_or_not(thinking_server):
    """/v1/responses: a `reasoning` output item (its text as reasoning_text) before the message,
    streamed as response.reasoning_text.delta events at output index 0 and the message at 1; the
    SDK's stream helper puts the same response together; its output items go back as input."""
    import openai

    tokens = post(thinking_server, "/tokenize", {"messages": TURNS}).json()["tokens"]
    completion = post(thinking_server, "/v1/completions", {"model": MODEL, "prompt": tokens, "max_tokens": 16,
                                                           "temperature": 0, "logprobs": 0}).json()["choices"][0]
    raw = completion["text"]
    assert "</think>" in raw and raw.split("</think>", 1)[1].strip()  # the model closed its thinking
    reasoning, content = ReasoningSplit.whole("qwen3", raw, opened=True)
    thinking_tokens = closing_token(completion["logprobs"]["tokens"])
    body = {"model": MODEL, "input": TURNS, "max_output_tokens": 16, "temperature": 0}

    response = post(thinking_server, "/v1/responses", body).json()
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["reasoning", "message"]
    assert response["output"][0]["status"] == "completed"
    assert response["usage"]["output_tokens_details"] == {"reasoning_tokens": thinking_tokens}
    scored = post(thinking_server, "/v1/responses", {**body, "include": ["message.output_text.logprobs"]}).json()
    tokens = [entry["token"] for entry in scored["output"][1]["content"][0]["logprobs"]]
    assert len(tokens) == scored["usage"]["output_tokens"] - thinking_tokens  # the message's tokens only
    assert "".join(tokens).strip().startswith(content) and "think>" not in "".join(tokens)  # (and the EOS)
    cut = post(thinking_server, "/v1/responses", {**body, "max_output_tokens": thinking_tokens - 1}).json()
    assert [(item["type"], item["status"]) for item in cut["output"]] == [("reasoning", "incomplete")]
    assert cut["usage"]["output_tokens_details"]["reasoning_tokens"] == cut["usage"]["output_tokens"]
    with httpx.stream("POST", thinking_server.url + "/v1/responses", timeout=120,
                      json={**body, "max_output_tokens": thinking_tokens - 1, "stream": True}) as r:
        kinds_streamed = [httpx.Response(200, content=line[6:]).json()["type"]
                          for line in r.iter_lines() if line.startswith("data: ")]
    assert kinds_streamed[-1] == "response.incomplete" and "response.content_part.added" not in kinds_streamed
    assert kinds_streamed.count("response.output_item.done") == 1
    assert response["output"][0]["content"] == [{"type": "reasoning_text", "text": reasoning}]
    assert response["output"][1]["content"][0]["text"] == content

    deltas = {"response.reasoning_text.delta": "", "response.output_text.delta": ""}
    indexes, events = {}, []
    with httpx.stream("POST", thinking_server.url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = httpx.Response(200, content=line[6:]).json()
                events.append(event)
                if event["type"] in deltas:
                    deltas[event["type"]] += event["delta"]
                    indexes.setdefault(event["type"], set()).add(event["output_index"])
                if event["type"] == "response.completed":
                    streamed = event["response"]
    assert deltas == {"response.reasoning_text.delta": reasoning, "response.output_text.delta": content}
    assert indexes == {"response.reasoning_text.delta": {0}, "response.output_text.delta": {1}}
    assert [item["type"] for item in streamed["output"]] == kinds
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [0, 1]  # each item once, the reasoning first
    done = [i for i, e in enumerate(events) if e["type"] == "response.output_item.done" and e["output_index"] == 0]
    assert len(done) == 1 and events[done[0]]["item"]["content"][0]["text"] == reasoning  # whole when done
    assert [e["text"] for e in events if e["type"] == "response.reasoning_text.done"] == [reasoning]
    assert not [e for e in events[done[0]:] if e["type"].startswith("response.reasoning_text")]

    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with client.responses.stream(model=MODEL, input=TURNS, max_output_tokens=16, temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_text == content and final.output[0].type == "reasoning"
    again = client.responses.create(model=MODEL, max_output_tokens=4, temperature=0,
                                    input=TURNS + [item.model_dump(exclude_none=True) for item in final.output]
                                    + [{"role": "user", "content": "Add 1 and 1."}])
    assert again.status in ("completed", "incomplete")


def test_an_assistant_messages_reasoning_reaches_the_template(thinking_server):
    """reasoning_content (or reasoning) on an assistant message, with or without tool calls, and a
    Responses reasoning item before an assistant message: rendered by a template that reads it."""
    def prompt(messages, **extra):
        tokens = post(thinking_server, "/tokenize", {"messages": messages, **extra}).json()["tokens"]
        return post(thinking_server, "/detokenize", {"tokens": tokens}).json()["prompt"]

    user = {"role": "user", "content": "Add 2 and 2."}
    for key in ("reasoning_content", "reasoning"):
        said = {"role": "assistant", "content": "4", key: "two plus two"}
        assert "<think>two plus two</think>4" in prompt([user, said, {"role": "user", "content": "Thanks."}])
    call = {"role": "assistant", "content": None, "reasoning_content": "look it up",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert "<think>look it up</think>" in prompt([user, call, {"role": "tool", "tool_call_id": "call_1",
                                                              "content": "4"}], tools=tools)


def test_responses_reasoning_items_go_with_the_assistant_message_after_them():
    from server.responses_protocol import ResponsesRequest

    def messages(items):
        return ResponsesRequest(model=MODEL, input=items).messages()

    thought = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "R"}]}
    said = {"role": "assistant", "content": "A"}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    user = {"role": "user", "content": "Q"}
    assert messages([user, thought, said])[1] == {"role": "assistant", "content": "A", "reasoning_content": "R"}
    with_call = messages([user, thought, call])[1]
    assert with_call["reasoning_content"] == "R" and with_call["tool_calls"][0]["id"] == "c1"
    assert all("reasoning_content" not in m for m in messages([thought, user, said]))  # not a later turn's
