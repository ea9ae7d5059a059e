"""The serving tokenizer (`tokenizers` + jinja2, engine/tokenizer.py) against transformers'
AutoTokenizer on the same folder: the same ids, text, chat prompts and special tokens, on both
embedded models (SmolLM2 with a chat template, Gemma 3 without one)."""
from __future__ import annotations

import pytest

from engine.tokenizer import Tokenizer

TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog.", "  leading and trailing  ",
         "naïve café — 日本語 🙂", "don't stop , ok ? 's", "<|im_start|>user\nhi<|im_end|>", "a\n\nb\tc", "",
         "<bos>x<eos>", "1234567890 3.14159"]
CHATS = [[{"role": "user", "content": "Explain why the sky is blue."}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye, ünïcode 🙂"}]]


def folders(engine):
    from engine.loader import ensure_hf_dir

    return {"smollm2": engine.hf_dir, "gemma3": ensure_hf_dir("gemma3-270m", dense=False)}


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_serving_tokenizer_equals_transformers(engine, model):
    from transformers import AutoTokenizer

    folder = folders(engine)[model]
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (ours.eos_token_id, ours.vocab_size) == (hf.eos_token_id, len(hf))
    assert ours.has_chat_template == bool(getattr(hf, "chat_template", None))
    assert ours.has_chat_template == (model == "smollm2")
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, special) == hf.encode(text, add_special_tokens=special), (text, special)
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert [ours.token_text(i) for i in ids] == [hf.decode([i], skip_special_tokens=False) for i in ids]
    if ours.has_chat_template:
        for chat in CHATS:
            assert ours.render_chat(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            assert ours.encode_chat(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                                    return_dict=False)


def test_a_template_that_refuses_the_messages_is_a_bad_request_not_a_failure(engine, tmp_path):
    """Some templates raise on roles they do not know or on turns that do not alternate: that is the
    request's messages at fault (a 400 naming them), not the server."""
    import json
    import shutil

    from engine.sampling_params import InvalidParamError

    shutil.copy(engine.hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('only user and assistant turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(InvalidParamError) as caught:
        tokenizer.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert caught.value.param == "messages" and "only user and assistant turns" in str(caught.value)


def test_developer_messages_are_system_ones_where_the_template_has_no_developer_role(engine, tmp_path):
    """OpenAI's `developer` role is its system prompt: SmolLM2's template, which names no such role,
    printed it as a turn of its own after its default system prompt. A template that has the role
    (gpt-oss's) gets it as sent."""
    import json
    import shutil

    smollm2 = Tokenizer(engine.hf_dir)
    chat = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    as_system = [{**chat[0], "role": "system"}, chat[1]]
    assert smollm2.render_chat(chat) == smollm2.render_chat(as_system)
    assert "developer" not in smollm2.render_chat(chat) and "Be brief." in smollm2.render_chat(chat)
    assert chat[0]["role"] == "developer"  # the caller's messages are left as they were
    shutil.copy(engine.hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    template = "{% for m in messages %}[{{ 'dev' if m['role'] == 'developer' else m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert Tokenizer(tmp_path).render_chat(chat) == "[dev]Be brief.[user]hi"


def test_without_a_template_chats_render_plain_and_template_variables_are_refused(engine):
    from engine.sampling_params import InvalidParamError
    from engine.tokenizer import ChatOptions

    gemma = Tokenizer(folders(engine)["gemma3"])
    assert not gemma.has_chat_template
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is "}]
    assert gemma.render_chat(chat, ChatOptions(add_generation_prompt=False, continue_final_message=True)) == \
        "user: hi\nassistant: The answer is"
    with pytest.raises(InvalidParamError) as caught:
        gemma.render_chat(chat, ChatOptions(variables={"enable_thinking": False}))
    assert caught.value.param == "chat_template_kwargs"
    # an answer comes back as the model wrote it after "assistant:", its space first: sent back in the
    # history, the prompt holds the text (and tokens) the model made, not a second space before it
    question = [{"role": "user", "content": "Capital of France?"}]
    answer = " The capital of France is Paris."
    history = gemma.render_chat([*question, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}])
    assert history.startswith(gemma.render_chat(question) + answer + "\n")
    assert history == gemma.render_chat([*question, {"role": "assistant", "content": answer.lstrip()},
                                         {"role": "user", "content": "Why?"}])


def test_logprob_tokens_keep_their_leading_space_under_a_decoder_that_strips_one(tmp_path):
    """Llama 2's SentencePiece decoder strips the text's first space (`Strip`): a token decoded alone
    lost it ("world" for "▁world"), so logprobs' tokens did not add up to the text. Gemma's
    tokenizer with that decoder step added stands in for it."""
    import json
    import shutil

    from engine.loader import ensure_hf_dir

    source = ensure_hf_dir("gemma3-270m", dense=False)
    spec = json.loads((source / "tokenizer.json").read_text())
    decoder = spec["decoder"]
    steps = decoder["decoders"] if decoder.get("type") == "Sequence" else [decoder]
    spec["decoder"] = {"type": "Sequence", "decoders": [*steps, {"type": "Strip", "content": " ", "start": 1,
                                                                   "stop": 0}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(source / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("Hello world, naïve 🙂", add_special_tokens=False)
    assert tokenizer._tok.decode(ids[1:2]) == "world"  # the token alone, as the decoder gives it
    texts = [tokenizer.token_text(i) for i in ids]
    assert texts[1] == " world"
    assert "".join(texts) == tokenizer.decode(ids, clean=False) == "Hello world, naïve 🙂"


def test_tokenizing_and_decoding_let_other_threads_run(engine):
    """The server tokenizes in worker threads so that the event loop goes on meanwhile: that needs the
    library to let Python's GIL go while it works (its batch calls do, its single-text calls do not).
    With a switch interval far longer than the work, a thread holding the GIL throughout would let the
    main thread run no line until it returned."""
    import sys
    import threading
    import time

    tokenizer = Tokenizer(engine.hf_dir)
    text = "hello world " * 40_000
    ids = tokenizer.encode(text) * 10  # (decoding is ~10x faster than encoding: as long a call)
    ticks: list[int] = []
    for work in (lambda: tokenizer.encode(text, False), lambda: tokenizer.encode_spans(text),
                 lambda: tokenizer.decode(ids)):
        meanwhile: list[int | BaseException] = []

        def worker():
            before = len(ticks)
            try:
                work()
            except BaseException as exc:  # (failed here, said by the test's thread)
                meanwhile.append(exc)
                return
            meanwhile.append(len(ticks) - before)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(5.0)  # (no forced hand-over within the work)
        try:
            thread = threading.Thread(target=worker)
            thread.start()
            while thread.is_alive():
                ticks.append(0)
                time.sleep(0.001)  # (lets the GIL go)
            thread.join()
        finally:
            sys.setswitchinterval(interval)
        if isinstance(meanwhile[0], BaseException):
            raise meanwhile[0]
        assert meanwhile[0] > 0
