"""gpt-oss's harmony answers split into reasoning, content and a tool call (server/harmony.py,
server/harmony_tools.py), whole and fed a character at a time, on the text forms OpenAI's harmony
guide and gpt-oss's chat template write."""
from __future__ import annotations

import json

import pytest

from server import harmony_tools, template_tools
from server.harmony import HarmonySplit, writes_harmony
from server.reasoning import Reasoning

THINK_THEN_ANSWER = ("<|channel|>analysis<|message|>The user wants a colour.<|end|>"
                     "<|start|>assistant<|channel|>final<|message|>Blue.")
TWO_THOUGHTS = ("<|channel|>analysis<|message|>First.<|end|><|start|>assistant<|channel|>analysis<|message|>Second."
                "<|end|><|start|>assistant<|channel|>final<|message|>Done.")
# the guide's form (recipient after the channel) and the template's (before it, content type after)
CALL_IN_CHANNEL = ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary '
                   'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
CALL_IN_ROLE = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
PREAMBLE_THEN_CALL = ('<|channel|>commentary<|message|>Checking the weather.<|end|><|start|>assistant<|channel|>commentary '
                      'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def streamed(text: str) -> tuple[str, str, HarmonySplit]:
    split, reasoning, content = HarmonySplit(), [], []
    for i, char in enumerate(text):
        r, c = split.feed(char, final=i == len(text) - 1, tokens=1)
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content), split


@pytest.mark.parametrize("text, reasoning, content", [
    (THINK_THEN_ANSWER, "The user wants a colour.", "Blue."),
    (TWO_THOUGHTS, "First.\nSecond.", "Done."),
    ("<|channel|>final<|message|>Just the answer.", None, "Just the answer."),
    ('{"answer": 42}', None, '{"answer": 42}'),  # no header (an answer held to a grammar): all content
    ("<|channel|>analysis<|message|>Cut off while thin", "Cut off while thin", ""),  # max_tokens
    ("\n<|channel|>final<|message|>Hi.", None, "Hi."),  # whitespace before the first header
    ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|>Blue.", None,
     "Checking.\nBlue."),  # a preamble, then the answer
    ('<|channel|>commentary to=browser.search <|constrain|>json<|message|>{"q": "x"}', None,
     '{"q": "x"}'),  # a built-in tool this server does not run: its body, no markup
    ("to=be or not", None, "to=be or not"),  # looks like a recipient, is text
])
def test_channels_split_whole_and_streamed_alike(text, reasoning, content):
    assert HarmonySplit.whole(text) == (reasoning, content)
    streamed_reasoning, streamed_content, split = streamed(text)
    assert (streamed_reasoning, streamed_content) == (reasoning or "", content)
    assert split.thought == (reasoning is not None)


def test_reasoning_tokens_count_up_to_the_last_analysis_message():
    _, _, split = streamed(THINK_THEN_ANSWER)
    assert split.reasoning_tokens == THINK_THEN_ANSWER.index("<|start|>")
    _, _, cut = streamed("<|channel|>analysis<|message|>Still thinking")
    assert cut.reasoning_tokens == len("<|channel|>analysis<|message|>Still thinking")


def test_nothing_of_an_end_tag_streams_before_it_is_known():
    split = HarmonySplit()
    assert split.feed("<|channel|>final<|message|>Blue<|e") == ("", "Blue")
    assert split.feed("nd|>", final=True) == ("", "")


@pytest.mark.parametrize("text, reasoning, preamble", [
    (CALL_IN_CHANNEL, "Need the weather.", None),
    (CALL_IN_ROLE, None, None),
    (PREAMBLE_THEN_CALL, None, "Checking the weather."),
])
def test_a_message_to_a_function_is_a_tool_call(text, reasoning, preamble):
    got_reasoning, content = HarmonySplit.whole(text)
    assert got_reasoning == reasoning
    assert streamed(text)[1] == content
    parsed = harmony_tools.parse(content, TOOLS, parallel=True)
    assert parsed is not None
    before, calls = parsed
    assert before == preamble
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    assert content[:harmony_tools.sendable(content)].strip() == (preamble or "")


@pytest.mark.parametrize("text", [
    THINK_THEN_ANSWER,  # no call
    CALL_IN_ROLE.replace("get_weather", "get_time"),  # a tool not listed
    CALL_IN_ROLE.replace('{"city": "Paris"}', '["Paris"]'),  # arguments that are no object
    CALL_IN_ROLE.replace('{"city": "Paris"}', '{"city": '),  # cut off
    " to=functions.<|message|>{}",  # no name
])
def test_anything_else_is_no_call(text):
    assert harmony_tools.parse(HarmonySplit.whole(text)[1], TOOLS, parallel=True) is None


def test_harmony_templates_are_told_apart():
    harmony = ("{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}"
               "{%- if tools %}to=functions.{% endif %}")
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
    assert writes_harmony(harmony) and not writes_harmony(chatml)
    assert template_tools.detect(harmony) == "openai" and template_tools.detect(chatml) == "json"
    assert isinstance(Reasoning("openai_gptoss", False).split(), HarmonySplit)


def test_a_harmony_vocabulary_ends_generations_at_return_and_call_but_not_at_end():
    """`<|end|>` closes the thinking within a gpt-oss answer; Phi-3's `<|end|>` still ends its turn."""
    from types import SimpleNamespace

    from engine.loader import end_of_generation_ids

    def tokenizer(specials: dict) -> SimpleNamespace:
        return SimpleNamespace(added_tokens_decoder={i: SimpleNamespace(content=text, special=True)
                                                     for i, text in specials.items()})

    gpt_oss = tokenizer({199999: "<|endoftext|>", 200002: "<|return|>", 200007: "<|end|>", 200012: "<|call|>"})
    assert sorted(end_of_generation_ids({}, gpt_oss, [200002, 199999])) == [199999, 200002, 200012]
    phi3 = tokenizer({32000: "<|endoftext|>", 32007: "<|end|>"})
    assert sorted(end_of_generation_ids({}, phi3, 32000)) == [32000, 32007]


@pytest.mark.parametrize("parser, tokens, reasoning, content", [
    ("gpt_oss", ["<|channel|>", "analysis", "<|message|>", "Think", "ing", ".", "<|end|>", "<|start|>", "assistant",
                 "<|channel|>", "final", "<|message|>", "Bl", "ue", "."], "Thinking.", ["Bl", "ue", "."]),
    ("qwen3", ["<think>", "Hm", "</think>", "\n\n", "Bl", "ue"], "Hm", ["Bl", "ue"]),
    # content that opens with what may be `<|end|>` (held back a token); a final message alone; the
    # held text all there is when the answer ends; no parser's tags at all;
    ("gpt_oss", ["<|channel|>", "final", "<|message|>", "<", "b", ">"], "", ["<", "b", ">"]),
    ("gpt_oss", ["<|channel|>", "final", "<|message|>", "Bl", "ue"], "", ["Bl", "ue"]),
    ("gpt_oss", ["<|channel|>", "final", "<|message|>", "<"], "", ["<"]),
    ("qwen3", ["Bl", "ue"], "", ["Bl", "ue"]),
    # text that is decided only when the answer ends: a recipient-like opening, a possible `<think>`
    ("gpt_oss", ["to=", "be"], "", ["to=", "be"]),
    ("qwen3", ["<"], "", ["<"]),
])
@pytest.mark.parametrize("per_output", [1, 4])  # a token per output, or several (speculative decoding's steps)
def test_the_responses_messages_logprobs_are_its_contents_tokens(parser, tokens, reasoning, content, per_output):
    """server/responses.py: the message's logprobs start at its content's first token, past the
    thinking and (harmony) the final message's header, whichever parser split the answer."""
    from engine.outputs import SequenceOutput, TokenLogprob
    from server.responses import Answer

    answer = Answer(Reasoning(parser, False))
    for at in range(0, len(tokens), per_output):
        run = tokens[at:at + per_output]
        end = at + per_output >= len(tokens)
        answer.add(SequenceOutput("r", 0, "".join(run), list(range(at, at + len(run))),
                                  [TokenLogprob(t, 0, -1.0, []) for t in run], end, "stop" if end else None,
                                  4, 0, at + len(run), 0, 0))
        so_far = [entry.token for entry in answer.content_logprobs]  # as a stream reads them, output by output
        assert so_far == content[:len(so_far)]
    assert (answer.reasoning, answer.content) == (reasoning, "".join(content))
    assert [entry.token for entry in answer.content_logprobs] == content
