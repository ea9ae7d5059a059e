"""Gemma 3 270M: the preset serves completions whose greedy tokens equal HF transformers'."""
from __future__ import annotations

import pytest
import torch

from engine.tokenizer import PLAIN_CHAT_TURNS
from tests.conftest import ServerProcess
from tests.helpers import assert_gguf_weights_equal_the_dense_conversion, assert_layer_calls_equal_the_per_op_path, hf_greedy

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gemma_server():
    srv = ServerProcess("--model", "gemma3-270m", "--device", "cpu", "--max-batch", "4", "--max-model-len", "1024")
    yield srv
    srv.stop()


def test_gemma3_preset_greedy_tokens_equal_hf(gemma_server):
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.loader import ensure_hf_dir

    hf_dir = ensure_hf_dir("gemma3-270m")  # dense weights for HF (the server read the GGUF itself)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    client = openai.OpenAI(base_url=gemma_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    for prompt in PROMPTS:
        r = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=20, temperature=0, logprobs=0)
        expected = hf_greedy(hf, tokenizer.encode(prompt), 20)
        assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert r.usage.completion_tokens == len(expected)


def test_gemma3_chat_without_a_template_keeps_bos(gemma_server):
    """The GGUF carries no chat template: the server renders "role: content" lines and must tokenize
    them as /v1/completions tokenizes text, BOS first (Gemma without BOS answers noise)."""
    import httpx
    import openai
    from transformers import AutoTokenizer

    from engine.loader import ensure_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_hf_dir("gemma3-270m", dense=False)))
    messages = [{"role": "user", "content": "The capital of France is"}]
    tokens = httpx.post(gemma_server.url + "/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    assert tokens[0] == tokenizer.bos_token_id
    client = openai.OpenAI(base_url=gemma_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    chat = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=12, temperature=0)
    text = client.completions.create(model="gemma3-270m", prompt="user: The capital of France is\nassistant:",
                                     max_tokens=12, temperature=0).choices[0].text
    turn = min((text.index(t) for t in PLAIN_CHAT_TURNS if t in text), default=len(text))  # (where a chat stops)
    assert chat.choices[0].message.content == text[:turn]


def test_gemma3_chat_answers_end_where_the_model_writes_the_next_turn(gemma_server):
    """A base model goes on with the transcript ("system: ..."): the plain lines' chat stops there, as
    a template's end-of-turn token would; its stop reason says where."""
    import httpx

    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    body = {"model": "gemma3-270m", "messages": messages, "max_tokens": 16, "temperature": 0}
    choice = httpx.post(gemma_server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    prompt = "system: You are terse.\nuser: What is the capital of France?\nassistant:"
    text = httpx.post(gemma_server.url + "/v1/completions", json={
        "model": "gemma3-270m", "prompt": prompt, "max_tokens": 16, "temperature": 0}, timeout=120).json()
    whole = text["choices"][0]["text"]
    ends = [(whole.index(t), t) for t in PLAIN_CHAT_TURNS if t in whole]
    assert ends, whole  # (this greedy answer goes on to a next turn: what the test is about)
    at, turn = min(ends)
    assert choice["message"]["content"] == whole[:at]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == turn


def test_gemma3_responses_end_where_the_model_writes_the_next_turn(gemma_server):
    """The Responses API renders the same plain lines: its answer stops at the same place."""
    import httpx

    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    chat = httpx.post(gemma_server.url + "/v1/chat/completions", json={
        "model": "gemma3-270m", "messages": messages, "max_tokens": 16, "temperature": 0}, timeout=120).json()
    r = httpx.post(gemma_server.url + "/v1/responses", json={
        "model": "gemma3-270m", "instructions": "You are terse.", "input": "What is the capital of France?",
        "max_output_tokens": 16, "temperature": 0}, timeout=120).json()
    assert chat["choices"][0]["finish_reason"] == "stop"  # (it stopped at a turn line: the previous test)
    assert r["status"] == "completed" and r["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]


def test_gemma3_end_of_turn_is_a_stop_token_named_as_the_stop_reason(gemma_server):
    """<end_of_turn> (106), an eos id of the generation config beside the tokenizer's <eos>, ends the
    answer with itself as the stop reason, as vLLM makes such ids stop tokens; <eos> ends it with none."""
    import httpx

    def answer(bias: dict) -> dict:
        return httpx.post(gemma_server.url + "/v1/completions", json={
            "model": "gemma3-270m", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "logit_bias": bias},
            timeout=120).json()["choices"][0]

    ended = answer({"106": 100})
    assert ended["finish_reason"] == "stop" and ended["stop_reason"] == 106 and ended["text"] == ""
    eos = answer({"1": 100})
    assert eos["finish_reason"] == "stop" and eos["stop_reason"] is None


def test_gemma3_answers_hold_to_a_json_schema(gemma_server):
    """Gemma's tokens are SentencePiece pieces with byte fallback, not byte-level BPE: the masks
    read their bytes another way (engine/tokenizer.py `token_bytes`). A schema whose documents are
    bounded (an enum, an integer) must end within max_tokens, in JSON the schema allows."""
    import json

    import openai

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Madrid"]},
                                               "founded": {"type": "integer"}},
              "required": ["city", "founded"], "additionalProperties": False}
    client = openai.OpenAI(base_url=gemma_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    for temperature in (0.0, 1.0):
        r = client.completions.create(model="gemma3-270m", prompt="The capital of France, as JSON:", max_tokens=200,
                                      temperature=temperature, seed=2, extra_body={"response_format": {
                                          "type": "json_schema", "json_schema": {"name": "city", "schema": schema}}})
        assert r.choices[0].finish_reason == "stop"
        answer = json.loads(r.choices[0].text)
        assert set(answer) == {"city", "founded"} and answer["city"] in ("Paris", "Rome", "Madrid")
        assert isinstance(answer["founded"], int)


def test_gemma3_embeddings_are_hf_states_mean_pooled(gemma_server):
    """Gemma's layer (four norms, sliding windows) through /v1/embeddings: the served Q4_K_M model's
    vectors point where HF's `last_hidden_state`, mean-pooled, points on the same (dequantized) weights."""
    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.loader import ensure_hf_dir

    hf_dir = ensure_hf_dir("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    inputs = [tokenizer.encode(p) for p in PROMPTS]
    r = httpx.post(gemma_server.url + "/v1/embeddings", timeout=120,
                   json={"model": "gemma3-270m", "input": inputs, "encoding_format": "float"}).json()
    for ids, item in zip(inputs, r["data"]):
        with torch.inference_mode():
            ref = hf.model(torch.tensor([ids])).last_hidden_state[0].double().mean(0)
        ours = torch.tensor(item["embedding"], dtype=torch.float64)
        cosine = (ours @ ref / ref.norm()).item()
        assert cosine > 0.999  # (1.0000000 to 7 digits here; these prompts' vectors are -0.20 to 0.80 apart)


@pytest.fixture(scope="module")
def gemma_engine():
    from engine.llm_engine import LLMEngine
    from server.config_file import load_config, preset_path

    config = load_config(preset_path("gemma3-270m"))  # as served: the GGUF's quantized weights
    config.device, config.max_num_seqs, config.max_model_len = "cpu", 4, 1024
    return LLMEngine(config)


def test_gemma3_gguf_weights_equal_the_dense_conversion():
    """Gemma's norms as the GGUF holds them (1 + w) undone, its four norms a layer and per-head
    q/k norms named, its quantized matrices repacked: transformers' dense conversion, bit for bit."""
    from engine.loader import embedded_gguf, ensure_hf_dir

    weights, _ = assert_gguf_weights_equal_the_dense_conversion(embedded_gguf("gemma3-270m"),
                                                                ensure_hf_dir("gemma3-270m"))
    assert "model.layers.0.post_feedforward_layernorm.weight" in weights


def test_gemma3_native_decode_step_is_the_per_op_path_to_the_bit(gemma_engine):
    """Gemma's layers in decode_layers.cpp (four norms, per-head q/k norms, GELU-tanh, two rotary
    tables): logits, K/V and skips equal the per-op path's, dense and skipping. Two rows' contexts
    (600 and 530 tokens) reach past the 512-token sliding window, one is short."""
    if gemma_engine.runner.model.fused_decode is None:
        pytest.skip("no native GEMMs for these weights on this CPU")
    assert gemma_engine.runner.model.cfg.sliding_window == 512
    tokenizer = gemma_engine.tokenizer
    long = tokenizer.encode(" ".join(f"item {i} is {i * 7 % 13}." for i in range(200)))
    prompts = [long[:600], tokenizer.encode(PROMPTS[0]), long[:530]]
    assert len(prompts[0]) == 600 and len(prompts[2]) == 530
    assert_layer_calls_equal_the_per_op_path(gemma_engine, prompts)


def test_gemma3_speculation_and_short_chunks_give_the_tokens_of_plain_decoding(gemma_engine):
    """With the native step, Gemma's drafts are checked as decode rows of their sequence, and short
    prompt chunks after a cached prefix go as rows too: the greedy tokens stay plain decoding's, past
    the sliding window as well (a 600-token prompt that repeats itself, so drafts are taken)."""
    from engine.sampling_params import SamplingParams
    from tests.helpers import assert_all_blocks_back, engine_like

    speculative = engine_like(gemma_engine, speculative_tokens=4)
    if not speculative.speculative_tokens:
        pytest.skip("speculation needs the native CPU decode step (no native GEMMs here)")
    tokenizer = gemma_engine.tokenizer
    text = " ".join(f"Station {i} reports {i * 7 % 13} boats." for i in range(60))
    prompt = tokenizer.encode(text + "\n\nAgain, word for word:\n" + text[:300])
    follow = prompt + tokenizer.encode(" Then", add_special_tokens=False)  # a short chunk after the cached prompt
    assert len(prompt) > 512
    params = SamplingParams(max_tokens=48, temperature=0)

    def greedy(engine, ids):
        engine.add_request("r", ids, params)
        out = []
        while engine.has_work:
            out += [t for o in engine.step()[0] for t in o.token_ids]
        return out

    plain = [greedy(gemma_engine, p) for p in (prompt, follow)]
    accepted = speculative.accepted_draft_tokens_total
    assert [greedy(speculative, p) for p in (prompt, follow)] == plain
    assert speculative.accepted_draft_tokens_total > accepted  # the copy's drafts were taken
    assert_all_blocks_back(speculative)


def test_a_config_with_only_sliding_window_pattern_gets_its_layer_types(tmp_path):
    """Configs written before `layer_types` name the pattern only: the embedded model's layer types
    come back from `sliding_window_pattern` 6 (every sixth layer full attention)."""
    import json

    from engine.config import ModelConfig
    from engine.loader import ensure_hf_dir

    raw = json.loads((ensure_hf_dir("gemma3-270m", dense=False) / "config.json").read_text())
    given = ModelConfig.from_hf_dir(ensure_hf_dir("gemma3-270m", dense=False)).layer_types
    assert given.count("full_attention") == 3 and len(given) == 18
    older = {k: v for k, v in raw.items() if k != "layer_types"} | {"sliding_window_pattern": 6}
    (tmp_path / "config.json").write_text(json.dumps(older))
    assert ModelConfig.from_hf_dir(tmp_path).layer_types == given


def test_gemma3_echo_text_offsets_index_the_text_streamed_or_not(gemma_server):
    """Gemma adds BOS, which an echoed prompt's text leaves out: its offset is 0 and it moves the
    next token's by nothing, so each offset indexes that token's text in `text`; streamed offsets
    (prompt first, then each output chunk's) are the same."""
    import json

    import httpx

    body = {"model": "gemma3-270m", "prompt": "Hello world", "echo": True, "logprobs": 1, "max_tokens": 6,
            "temperature": 0}
    whole = httpx.post(gemma_server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    logprobs = whole["logprobs"]
    assert logprobs["tokens"][0] == "<bos>" and logprobs["text_offset"][:2] == [0, 0]
    assert whole["text"].startswith("Hello world")
    for token, offset in zip(logprobs["tokens"][1:], logprobs["text_offset"][1:]):
        if "\ufffd" not in token:
            assert whole["text"][offset:offset + len(token)] == token
    streamed = []
    with httpx.stream("POST", gemma_server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    streamed += (choice.get("logprobs") or {}).get("text_offset", [])
    assert streamed == logprobs["text_offset"]


def test_add_special_tokens_decides_the_bos_of_a_chat_prompt(gemma_server):
    """vLLM's `add_special_tokens` on chat (and /tokenize with messages): the embedded Gemma 3 GGUF
    has no chat template, so its chat prompt is plain lines that get the tokenizer's BOS by default
    (as a completion prompt does); false leaves it out, true keeps it."""
    import httpx

    messages = [{"role": "user", "content": "hi"}]

    def tokens(**extra):
        r = httpx.post(gemma_server.url + "/tokenize", json={"messages": messages, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    plain = tokens()
    bos = httpx.post(gemma_server.url + "/tokenize", json={"prompt": ""}, timeout=30).json()["tokens"]
    assert bos and plain[:len(bos)] == bos
    assert tokens(add_special_tokens=True) == plain and tokens(add_special_tokens=False) == plain[len(bos):]
    r = httpx.post(gemma_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "gemma3-270m", "messages": messages, "max_tokens": 1, "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(plain) - len(bos)
