"""LoRA adapters (engine/lora): a request naming an adapter is computed through it, as transformers'
model with the adapter merged computes it; a batch mixes adapters and the base model row by row;
cached prefixes are never shared across them; an adapter that would be applied only in part is
refused by name. Then the server: --lora-modules, /v1/models, the routes that take an adapter and
those that refuse one."""
from __future__ import annotations

import copy
import gc
import json
import logging
import re
import time
import weakref

import httpx
import numpy as np
import pytest
import torch

from engine.lora.errors import AdapterError
from engine.lora.names import scaled_name
from engine.lora.registry import DEFAULT_ADAPTER
from engine.lora.scaled_set import ScaledSet
from engine.sampling_params import InvalidParamError, SamplingParams, SkipParams
from tests.conftest import ServerProcess, cpu_path_only, cuda_available
from tests.helpers import assert_layer_calls_equal_the_per_op_path, engine_like, hf_model_of
from tests.lora_files import merged_model, write_adapter, write_gguf_adapter

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapters(engine, tmp_path_factory):
    """Two adapters for the embedded model: one on every projection but k, one on q, k and v of
    some layers (k's rows placed between q's and v's in the fused projection)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"ada": write_adapter(root / "ada", engine.model_config),
            "qkv": write_adapter(root / "qkv", engine.model_config, modules=("q_proj", "k_proj", "v_proj"),
                                 layers=[0, 5, 29], rank=4, alpha=4.0, std=0.15, seed=1)}


@pytest.fixture(scope="module")
def lora_engine(engine, adapters):
    return engine_like(engine, lora_modules={name: str(path) for name, path in adapters.items()})


@pytest.fixture(scope="module")
def references(lora_engine, adapters):
    hf = hf_model_of(lora_engine)
    return {None: hf, **{name: merged_model(hf, path) for name, path in adapters.items()}}


def greedy(engine, prompt: list[int], adapter: str | None, max_tokens: int = 24, skip=None):
    out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, adapter=adapter), skip)
    return out[0][1], out[0][2]


@pytest.mark.parametrize("adapter", ["ada", "qkv", None])
def test_an_adapters_answer_is_the_merged_models(lora_engine, references, adapter):
    """Prefill and decode (teacher-forced over the engine's own greedy answer) within fp32 rounding of
    transformers' model with the adapter merged into its weights, and far from the base model's."""
    prompt = lora_engine.tokenizer.encode_chat(QUESTION)
    tokens, _ = greedy(lora_engine, prompt, adapter)
    with torch.no_grad():
        reference = references[adapter](torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        base = references[None](torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    chosen = reference.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (reference.max(dim=1).values - chosen).max() < 1e-3  # each token the reference's greedy choice
    if adapter is not None:
        assert (reference - base).abs().max() > 1.0  # (an adapter left out would fail the line above)
    runner = lora_engine.runner
    with lora_engine.kv_blocks([len(prompt)]) as (table,):
        ours = runner.logits(runner.prefill([(prompt, table, 0)], adapters=[lora_engine.lora.slots.get(adapter, 0)]))
    with torch.no_grad():
        expected = references[adapter](torch.tensor([prompt])).logits[0]
    assert (ours - expected).abs().max() < 1e-3


def test_a_batch_mixes_adapters_and_the_model_row_by_row(lora_engine, chat_prompts, caplog):
    """Rows of two adapters and of the model in the same steps, joining at different steps, some
    skipping FFNs (a skip gate runs an FFN on the rows that do not skip it: each row's adapter
    follows it there): each answer is the one it gets alone (the CPU path's kernels are
    batch-invariant). (The batch-aligned policy's gate runs its FFNs through the same `ffn_except`.)"""
    engine = lora_engine
    skip = SkipParams(budget=0.5, threshold=0.5, warmup_tokens=4)  # (skips from the fifth token on)
    asks = [(chat_prompts[i % len(chat_prompts)], adapter, budget) for i, (adapter, budget) in
            enumerate([("ada", skip), (None, None), ("qkv", skip), ("ada", None), (None, skip), ("qkv", None)])]
    alone = [greedy(engine, prompt, adapter, 32, budget) for prompt, adapter, budget in asks]
    made, skipped = {i: [] for i in range(len(asks))}, {}
    step = 0
    caplog.set_level(logging.WARNING, logger="skipserve.engine")
    while step < 2 * len(asks) or engine.has_work:
        if step % 2 == 0 and step // 2 < len(asks):
            prompt, adapter, budget = asks[step // 2]
            engine.add_request(f"mix-{step // 2}", prompt, SamplingParams(max_tokens=32, temperature=0.0,
                                                                          adapter=adapter), budget)
        for out in engine.step()[0]:
            made[int(out.request_id.split("-")[1])] += out.token_ids
            skipped[int(out.request_id.split("-")[1])] = out.ffn_skipped
        step += 1
    assert "batched step failed" not in caplog.text  # (each row run alone after a failure would pass below)
    assert [made[i] for i in range(len(asks))] == [tokens for tokens, _ in alone]
    assert [skipped[i] for i in range(len(asks))] == [out.ffn_skipped for _, out in alone]
    assert skipped[0] > 0 and skipped[2] > 0 and skipped[1] == 0  # (skips among adapter rows: the case above)
    assert alone[0][0] != greedy(engine, asks[0][0], None, 32, skip)[0]  # (the adapter matters here)


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_adapter_rows_decode_in_the_native_step_with_the_per_op_paths_bits(lora_engine, chat_prompts, monkeypatch,
                                                                            dtype):
    """Decode steps mixing rows of both adapters and of the model run in the native step, the adapters'
    pairs inside its calls (decode_layers.cpp's LORA projections), and give the per-op path's logits,
    K/V and skip counts to the bit: dense, and with FFN-SkipLLM's rule skipping inside the call (an
    FFN's running rows gathered with their slots). Two rows of one adapter, apart. fp32 weights, and
    the GGUF's quantized ones as served (dtype auto)."""
    engine = lora_engine if dtype == "float32" else engine_like(lora_engine, dtype=dtype)
    if dtype == "auto" and not engine.runner.quantized:
        pytest.skip("no quantized kernel for this CPU (x86-64-v3 or newer) or no native library")
    fused = engine.runner.model.fused_decode
    if fused is None:
        pytest.skip("no native decode step here (no native GEMMs for these weights on this CPU)")
    slots = engine.lora.slots
    native = []
    real = fused.layers_step

    def layers_step(*args):
        native.append(args[-1] is not None and len(args) == 11)  # (x, 7 of the step, rule, table, slots)
        return real(*args)

    monkeypatch.setattr(fused, "layers_step", layers_step)
    assert_layer_calls_equal_the_per_op_path(engine, chat_prompts[:4],
                                             adapters=[slots["ada"], 0, slots["qkv"], slots["ada"]])
    assert native.count(True) == 2  # the dense step and the per-row rule's in the native call, with the adapters


def test_cached_prefixes_are_never_shared_across_adapters(lora_engine, chat_prompts):
    """The same long prompt through an adapter, the model, the adapter again and another adapter:
    only the adapter's second request finds its K/V cached."""
    prompt = sum(chat_prompts, [])[::-1][:120]  # (no other test's prompt: nothing of it cached yet)
    cached = [greedy(lora_engine, prompt, adapter, 2)[1].cached_tokens for adapter in ("ada", None, "ada", "qkv", None)]
    assert cached[:2] == [0, 0] and cached[2] >= 96 and cached[3] == 0 and cached[4] >= 96


def test_an_adapter_answers_the_same_with_drafts_and_with_skips(lora_engine, chat_prompts):
    """Speculative decoding checks an adapter's drafts as rows of the same decode step;
    a skip budget skips FFNs of an adapter's rows."""
    prompt = chat_prompts[2]
    plain, _ = greedy(lora_engine, prompt, "ada", 32)
    speculative = engine_like(lora_engine, speculative_tokens=4)
    assert greedy(speculative, prompt, "ada", 32)[0] == plain
    assert speculative.draft_tokens_total > 0
    tokens, out = greedy(lora_engine, prompt, "ada", 32, SkipParams(budget=0.5))
    assert out.ffn_skipped > 0 and tokens


def test_an_unknown_adapter_is_refused(lora_engine, engine, chat_prompts):
    for eng, message in ((lora_engine, "no LoRA adapter named 'nope' is served (ada, qkv)"),
                         (engine, "none: --lora-modules")):
        with pytest.raises(InvalidParamError, match=re.escape(message)) as exc:
            eng.add_request("unknown", chat_prompts[0], SamplingParams(max_tokens=2, adapter="nope"))
        assert exc.value.param == "model"


def cases(cfg):
    other = copy.copy(cfg)
    other.hidden_size = cfg.hidden_size * 2
    return [
        ("dora", dict(use_dora=True), cfg, "uses DoRA"),
        ("saved", dict(modules_to_save=["lm_head"]), cfg, "uses modules_to_save"),
        ("bias", dict(bias="all"), cfg, "trains biases"),
        ("prefix", dict(peft_type="PREFIX_TUNING"), cfg, "is a PREFIX_TUNING adapter"),
        ("other", {}, other, "(an adapter for another model?)"),
        ("rank", dict(rank=8), cfg, "has rank 8, more than --max-lora-rank 4"),
        ("null", dict(r=None), cfg, "r must be an integer >= 1, got None"),
    ]


def test_adapters_that_cannot_be_served_whole_are_refused_by_name(lora_engine, tmp_path):
    registry = lora_engine.runner.lora
    before = dict(registry.slots)
    for name, config, cfg, message in cases(lora_engine.model_config):
        folder = write_adapter(tmp_path / name, cfg, layers=[0], **{"rank": 4, **config})
        with pytest.raises(AdapterError, match=f"LoRA adapter '{name}'.*{re.escape(message)}"):
            registry.load(name, str(folder), max_rank=4)
    folder = write_adapter(tmp_path / "embed", lora_engine.model_config, layers=[0])
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file(tensors | {"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(8, 10)}, str(weights))
    with pytest.raises(AdapterError, match="changes base_model.model.model.embed_tokens.lora_A.weight: only"):
        registry.load("embed", str(folder))
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(weights))
    with pytest.raises(AdapterError, match="has lora_A without its other half"):
        registry.load("half", str(folder))
    with pytest.raises(AdapterError, match="holds no adapter_config.json"):
        registry.load("none", str(tmp_path))
    with pytest.raises(AdapterError, match="is a file, neither a PEFT adapter folder"):
        registry.load("file", str(folder / "adapter_config.json"))
    (folder / "adapter_config.json").write_text("[1]")
    with pytest.raises(AdapterError, match="adapter_config.json is not a JSON object"):
        registry.load("list", str(folder))
    assert registry.slots == before  # nothing half loaded


# ---- the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_server(adapters):
    srv = ServerProcess("--lora-modules", f"ada={adapters['ada']}",
                        json.dumps({"name": "qkv", "path": str(adapters["qkv"]), "base_model_name": "x"}),
                        "--enable-lora", "--max-lora-rank", "8", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    yield srv
    srv.stop()


def test_served_adapters_are_listed_and_answer_as_their_model(lora_server):
    import openai

    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["smollm2-135m-instruct", "ada", "qkv"]
    assert cards["ada"].parent == "smollm2-135m-instruct" and cards["ada"].root.endswith("/ada")
    assert cards["smollm2-135m-instruct"].parent is None and cards["smollm2-135m-instruct"].root  # (vLLM's too)
    assert client.models.retrieve("qkv").parent == "smollm2-135m-instruct"
    answers, logprobs = {}, {}
    for model in ("smollm2-135m-instruct", "ada", "qkv"):
        r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0, logprobs=True)
        assert r.model == model and r.usage.completion_tokens > 0
        answers[model] = r.choices[0].message.content
        logprobs[model] = tuple(round(t.logprob, 3) for t in r.choices[0].logprobs.content)
    assert len(set(logprobs.values())) == 3 and answers["ada"] != answers["smollm2-135m-instruct"]
    # streamed, and through the Responses API and TGI's adapter_id: the same adapter's answers (equal
    # text where a row's bits do not depend on its neighbours: the CPU path)
    exact = not cuda_available()
    stream = client.chat.completions.create(model="ada", messages=QUESTION, max_tokens=16, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    responded = client.responses.create(model="ada", input=QUESTION, max_output_tokens=16, temperature=0).output_text
    assert streamed and responded and (not exact or streamed == responded == answers["ada"])
    completion = client.completions.create(model="qkv", prompt="The capital of France is", max_tokens=12, temperature=0)
    tgi = httpx.post(lora_server.url + "/generate", json={"inputs": "The capital of France is", "parameters": {
        "adapter_id": "qkv", "max_new_tokens": 12}}, timeout=60)
    base = httpx.post(lora_server.url + "/generate", json={"inputs": "The capital of France is", "parameters": {
        "max_new_tokens": 12}}, timeout=60)
    assert tgi.status_code == 200 and base.status_code == 200
    if exact:
        assert tgi.json()["generated_text"] == completion.choices[0].text != base.json()["generated_text"]


@pytest.mark.parametrize("route, body, status, param", [
    ("/v1/chat/completions", {"model": "nope", "messages": QUESTION}, 404, "model"),
    ("/v1/embeddings", {"model": "ada", "input": "hi"}, 400, "model"),
    ("/generate", {"inputs": "hi", "parameters": {"adapter_id": "nope"}}, 400, "parameters.adapter_id"),
])
def test_adapters_are_refused_where_they_do_not_apply(lora_server, route, body, status, param):
    r = httpx.post(lora_server.url + route, json=body, timeout=60)
    assert r.status_code == status and r.json()["error"]["param"] == param


def test_a_server_whose_adapter_cannot_be_served_exits_saying_why(engine, tmp_path):
    folder = write_adapter(tmp_path / "big", engine.model_config, layers=[0], rank=16)
    with pytest.raises(RuntimeError, match="LoRA adapter 'big' has rank 16, more than --max-lora-rank 8"):
        ServerProcess("--lora-modules", f"big={folder}", "--max-lora-rank", "8")


def chat(url: str, model: str, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": QUESTION, "max_tokens": 24,
                                                          "temperature": 0, "logprobs": True, **extra}, timeout=60)


def answer(response: httpx.Response) -> tuple:
    choice = response.json()["choices"][0]
    return choice["message"]["content"], [round(t["logprob"], 4) for t in choice["logprobs"]["content"]]


@cpu_path_only
def test_adapters_load_and_unload_while_serving(lora_server, adapters, tmp_path):
    """vLLM's run-time routes: an adapter loaded under a new name answers as the same folder under
    its start-up name; unloaded, it is refused, and a name loaded again from another folder answers
    as that folder (no weights or cached prefix of the first left behind)."""
    url = lora_server.url
    load = lambda name, path: httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    unload = lambda name: httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name})
    r = load("late", str(adapters["ada"]))
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'late' added successfully."
    assert "late" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert answer(chat(url, "late")) == answer(chat(url, "ada"))
    for name, path, param, message in (("late", str(adapters["qkv"]), "lora_name", "has already been loaded"),
                                       ("ada", str(adapters["qkv"]), "lora_name", "has already been loaded"),
                                       ("smollm2-135m-instruct", str(adapters["qkv"]), "lora_name", "model's own name"),
                                       ("new", str(tmp_path), "lora_path", "holds no adapter_config.json")):
        r = load(name, path)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and message in r.json()["error"]["message"]
    r = unload("late")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'late' removed successfully."
    assert chat(url, "late").status_code == 404 and unload("late").status_code == 404
    assert "late" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert load("late", str(adapters["qkv"])).status_code == 200
    assert answer(chat(url, "late")) == answer(chat(url, "qkv")) != answer(chat(url, "ada"))
    assert unload("late").status_code == 200


def lora_info(url: str) -> tuple[dict[str, str], float]:
    """The labels and value of the server's `lora_requests_info` gauge (vLLM's)."""
    lines = [line for line in httpx.get(url + "/metrics", timeout=5).text.splitlines()
             if line.startswith("skipserve:lora_requests_info{")]
    assert len(lines) == 1, lines
    return dict(re.findall(r'(\w+)="([^"]*)"', lines[0])), float(lines[0].split()[-1])


@cpu_path_only
def test_an_adapter_unloaded_mid_answer_finishes_that_answer(lora_server, adapters):
    """The answer streams on to its end with the adapter it began with; the LoRA info gauge names the
    adapter while its request runs, unloaded or not, and counts the adapters served."""
    url = lora_server.url
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "brief",
                                                           "lora_path": str(adapters["ada"])}).status_code == 200
    served = len(httpx.get(url + "/v1/models").json()["data"]) - 1  # (the model's card, then each adapter's)
    expected = chat(url, "ada", max_tokens=128, ignore_eos=True, logprobs=False).json()["choices"][0]["message"]
    body = {"model": "brief", "messages": QUESTION, "max_tokens": 128, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, info = "", []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
            if text and "unloaded" not in body:
                info.append(lora_info(url))
                body["unloaded"] = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "brief"}).status_code
                info.append(lora_info(url))
    assert body["unloaded"] == 200 and text == expected["content"]
    assert chat(url, "brief").status_code == 404
    info.append(lora_info(url))
    assert [labels for labels, _ in info] == [
        {"max_lora": str(served), "running_lora_adapters": "brief", "waiting_lora_adapters": ""},
        {"max_lora": str(served - 1), "running_lora_adapters": "brief", "waiting_lora_adapters": ""},
        {"max_lora": str(served - 1), "running_lora_adapters": "", "waiting_lora_adapters": ""}]
    assert all(abs(value - time.time()) < 120 for _, value in info)  # (vLLM's value: the time)


def test_the_run_time_routes_are_off_unless_asked_for(server):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 404 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true" in r.json()["error"]["message"]


def test_an_unloaded_adapters_weights_go_once_its_last_sequence_ends(lora_engine, adapters, chat_prompts):
    """Withdrawn while a request runs with it: the request finishes as it would have (its weights
    stay), and they go with its last sequence; the name is refused from the withdrawal on."""
    registry = lora_engine.lora
    expected, _ = greedy(lora_engine, chat_prompts[1], "ada", 12)
    registry.load("going", str(adapters["ada"]))
    lora_engine.add_request("going-1", chat_prompts[1], SamplingParams(max_tokens=12, temperature=0.0,
                                                                       adapter="going"))
    made = [t for out in lora_engine.step()[0] for t in out.token_ids]
    slot = registry.slots["going"]
    assert registry.adapters["going"].weights == {}  # (the pairs serve it: its fp32 copy went at install)
    weights = [weakref.ref(m.weight) for linears in registry._linears for linear in linears.values()
               for m in linear.pairs.get(slot, ())]
    slot = registry.withdraw("going")
    lora_engine.retire_adapter(slot)
    with pytest.raises(InvalidParamError, match="no LoRA adapter named 'going'"):
        lora_engine.add_request("going-2", chat_prompts[1], SamplingParams(max_tokens=2, adapter="going"))
    assert registry.holds(slot)
    while lora_engine.has_work:
        made += [t for out in lora_engine.step()[0] for t in out.token_ids]
    assert made == expected and not registry.holds(slot)
    gc.collect()
    assert weights and not [w for w in weights if w() is not None]  # (nor does a table of the native step hold them)


# ---- llama.cpp's adapters ---------------------------------------------------------------------------------

def test_llama_cpps_gguf_adapter_is_the_same_adapter(lora_engine, adapters, chat_prompts, tmp_path):
    """Both adapters as llama.cpp's convert_lora_to_gguf.py writes them (llama.cpp's names, q's and
    k's B rows in its rotary order, k by its 3 heads, q by its 9): in fp32 the same logits, bit for
    bit (the second with alpha 0, which llama.cpp reads as a scale of 1: its PEFT scale); in fp16
    within its rounding. A GGUF that is a model, not an adapter, is refused."""
    from engine.loader import embedded_gguf

    registry, cfg = lora_engine.lora, lora_engine.model_config
    registry.load("gguf32", str(write_gguf_adapter(tmp_path / "ada-f32.gguf", adapters["ada"], cfg)))
    registry.load("gguf16", str(write_gguf_adapter(tmp_path / "ada-f16.gguf", adapters["ada"], cfg, np.float16)))
    registry.load("gguf-qkv", str(write_gguf_adapter(tmp_path / "qkv.gguf", adapters["qkv"], cfg, alpha=0.0)))
    try:
        logits = {}
        for name in ("ada", "gguf32", "gguf16", "qkv", "gguf-qkv"):
            with lora_engine.kv_blocks([len(chat_prompts[3])]) as (table,):
                hidden = lora_engine.runner.prefill([(chat_prompts[3], table, 0)], adapters=[registry.slots[name]])
                logits[name] = lora_engine.runner.logits(hidden)
        assert torch.equal(logits["gguf32"], logits["ada"]) and torch.equal(logits["gguf-qkv"], logits["qkv"])
        assert 0 < (logits["gguf16"] - logits["ada"]).abs().max() < 0.05
        with pytest.raises(AdapterError, match="is not a LoRA adapter GGUF"):
            registry.load("model", str(embedded_gguf("smollm2-135m-instruct")))
    finally:
        for name in ("gguf32", "gguf16", "gguf-qkv"):
            registry.remove(registry.withdraw(name))


def test_llama_servers_lora_files_apply_together_to_the_model(lora_engine, adapters, references, chat_prompts,
                                                              tmp_path):
    """llama-server's --lora-scaled FILE SCALE (twice: a GGUF at 0.5, a PEFT folder at 2): every request
    that names the model goes through both, as transformers' model with both merged at those scales."""
    gguf = write_gguf_adapter(tmp_path / "ada.gguf", adapters["ada"], lora_engine.model_config)
    engine = engine_like(lora_engine, lora_modules={}, default_loras=[[str(gguf), 0.5], [str(adapters["qkv"]), 2.0]])
    assert engine.default_adapter == DEFAULT_ADAPTER and engine.adapters == {}
    merged = merged_model(merged_model(references[None], adapters["ada"], 0.5), adapters["qkv"], 2.0)
    prompt = chat_prompts[0]

    def logits():
        with engine.kv_blocks([len(prompt)]) as (table,):
            return engine.runner.logits(engine.runner.prefill([(prompt, table, 0)],
                                                              adapters=[engine.lora.slots[DEFAULT_ADAPTER]]))

    with torch.no_grad():
        assert (logits() - merged(torch.tensor([prompt])).logits[0]).abs().max() < 1e-3
    # POST /lora-adapters' change of scales: the first file left out (0), then both: the model alone; the
    # combination before served on under its scales' name (for requests asking for them) until withdrawn
    registry = engine.lora
    first = registry.slots[DEFAULT_ADAPTER]
    before = registry.set_default(registry.install_scaled([0.0, 2.0], *registry.read_scaled([0.0, 2.0])), [0.0, 2.0])
    assert before == scaled_name([0.5, 2.0]) and registry.slots[before] == first
    engine.retire_adapter(registry.withdraw(before))
    assert not registry.holds(first) and registry.default_scales == [0.0, 2.0]
    with torch.no_grad():
        only_qkv = merged_model(references[None], adapters["qkv"], 2.0)
        assert (logits() - only_qkv(torch.tensor([prompt])).logits[0]).abs().max() < 1e-3
    second = registry.slots[DEFAULT_ADAPTER]
    engine.retire_adapter(registry.withdraw(registry.set_default(None, [0.0, 0.0])))
    assert registry.slots[DEFAULT_ADAPTER] == 0 and not registry.holds(second)
    with pytest.raises(AdapterError, match="not finite in float32"):
        registry.read_scaled([float("inf"), 0.0])  # (the server refuses such scales before: `lora_scales`)


@cpu_path_only
def test_a_llama_server_lora_command_serves_the_adapter_as_the_model(lora_server, engine, adapters, tmp_path):
    """`--lora FILE.gguf`: the model's own name answers through the adapter (as the same adapter named
    under --lora-modules answers), /lora-adapters lists it, embeddings stay the model's; a request's
    own `lora` scales, and POST /lora-adapters' for every request."""
    gguf = write_gguf_adapter(tmp_path / "ada.gguf", adapters["ada"], engine.model_config)
    srv = ServerProcess("--lora", str(gguf))
    try:
        assert answer(chat(srv.url, "smollm2-135m-instruct")) == answer(chat(lora_server.url, "ada"))
        assert httpx.get(srv.url + "/lora-adapters").json() == [{"id": 0, "path": str(gguf), "scale": 1.0}]
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == ["smollm2-135m-instruct"]
        embedded = [httpx.post(s.url + "/v1/embeddings", json={"model": "smollm2-135m-instruct", "input": "hi"})
                    for s in (srv, lora_server)]
        assert embedded[0].json()["data"] == embedded[1].json()["data"]  # the model's own
        base, ada = answer(chat(lora_server.url, "smollm2-135m-instruct")), answer(chat(lora_server.url, "ada"))
        # a request's own scales (llama-server's `lora`; an adapter left out: 0): the server's, none, its own
        scaled = lambda lora, **more: chat(srv.url, "smollm2-135m-instruct", lora=lora, **more)
        # (as llama-server reads them: an id given twice at its last scale, one with no scale at 0)
        assert answer(scaled([{"id": 0, "scale": 1}])) == answer(scaled([{"id": 0}, {"id": 0, "scale": 1}])) == ada
        assert answer(scaled([])) == answer(scaled([{"id": 0}])) == base
        half = answer(scaled([{"id": 0, "scale": 0.5}]))
        assert half[1] != base[1] and half[1] != ada[1]
        assert answer(scaled([{"id": 0, "scale": 0.5}])) == half  # (the combination kept, or read again: the same)
        for lora, message in (([{"id": 1, "scale": 1.0}], "no LoRA adapter 1 (ids 0 to 0"),
                              ([{"id": 0, "scale": 1e3}], "lora[0].scale must be a number from -100 to 100")):
            r = scaled(lora)
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text
            assert message in r.json()["error"]["message"]
        assert chat(srv.url, "ada-nope", lora=[{"id": 0, "scale": 1}]).status_code == 404
        llama = httpx.post(srv.url + "/completion", json={"prompt": "The capital of France is", "n_predict": 8,
                                                           "temperature": 0, "lora": [{"id": 0, "scale": 0.5}]})
        v1 = httpx.post(srv.url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                                           "temperature": 0, "lora": [{"id": 0, "scale": 0.5}]})
        assert llama.status_code == 200 and llama.json()["content"] == v1.json()["choices"][0]["text"], llama.text
        # POST /lora-adapters: scale 0 (left out) answers as the model alone, a request's scale 1 still as the
        # adapter (the file combined for it), then back at 1
        for body, message in (([{"id": 0, "scale": "x"}], "invalid value for '0.scale'"),
                              ({"id": 0, "scale": 1}, "invalid request body: Input should be a valid list"),
                              ([{"id": 3, "scale": 1}], "body[0].id: no LoRA adapter 3")):
            r = httpx.post(srv.url + "/lora-adapters", json=body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert httpx.post(srv.url + "/lora-adapters", json=[]).json() == {"success": True}
        assert httpx.get(srv.url + "/lora-adapters").json() == [{"id": 0, "path": str(gguf), "scale": 0.0}]
        assert answer(chat(srv.url, "smollm2-135m-instruct")) == base
        assert answer(scaled([{"id": 0, "scale": 1}])) == ada
        assert httpx.post(srv.url + "/lora-adapters", json=[{"id": 0, "scale": 1.0}]).status_code == 200
        assert answer(chat(srv.url, "smollm2-135m-instruct")) == ada
        # an answer streaming while the scales change keeps those it began with, and its combination is kept
        # while it runs (newer ones asked for meanwhile push idle ones out, not it)
        expected = chat(lora_server.url, "ada", max_tokens=256, ignore_eos=True, logprobs=False).json()
        body = {"model": "smollm2-135m-instruct", "messages": QUESTION, "max_tokens": 256, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text, after = "", None
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
                    if text and after is None:
                        assert httpx.post(srv.url + "/lora-adapters", json=[]).status_code == 200
                        for scale in (0.11, 0.12, 0.13, 0.14, 0.15):
                            assert scaled([{"id": 0, "scale": scale}], max_tokens=1).status_code == 200
                        after = 0
                    elif after is not None:
                        after += 1
        assert after and text == expected["choices"][0]["message"]["content"]  # (chunks came after the change)
        assert answer(chat(srv.url, "smollm2-135m-instruct")) == base
        assert answer(scaled([{"id": 0, "scale": 1}])) == ada

        def made(scale: float) -> int:  # combinations made at this scale so far
            return srv.log_tail(10_000).count(f"lora:{scale}'")

        assert made(1.0) == 1  # (at start only: kept while the stream ran, though older than five others)
        # combinations beyond the four kept ready go (their slots removed, none in use), those kept are not made again
        removed = srv.log_tail(10_000).count("LoRA adapter slot")
        for scale in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7):
            assert scaled([{"id": 0, "scale": scale}], max_tokens=2).status_code == 200
        assert srv.log_tail(10_000).count("LoRA adapter slot") - removed == 6
        assert scaled([{"id": 0, "scale": 0.7}], max_tokens=2).status_code == 200 and made(0.7) == 1
    finally:
        srv.stop()


def test_scale_combinations_kept_are_the_most_recently_asked_for_and_none_in_use():
    """engine/lora/scaled_set.py: beyond KEPT idle combinations the least recently asked for go; one
    pinned (a request being added) or in use (a running sequence's, the server's own) never goes."""
    kept = ScaledSet()
    names = [f"c{i}" for i in range(kept.KEPT + 3)]
    for name in names:
        kept.asked(name)
    kept.pin("c0")
    kept.asked("c1")  # asked for again: now the most recent
    assert kept.idle(lambda name: name == "c2") == ["c3"]  # (c4, c5, c6, c1 kept)
    assert len(kept) == kept.KEPT + 2 and kept.idle(lambda name: False) == ["c2"]  # (no longer in use)
    assert kept.unpin("c0") and not kept.unpin("c0") and not kept.unpin(None)
    assert kept.idle(lambda name: False) == ["c0"]  # unpinned: the least recently asked for
    kept.kept("c1")  # (the server's scales before a change: kept where it stands in the order)
    assert kept.idle(lambda name: False) == [] and len(kept) == kept.KEPT and not kept.full
    for i in range(kept.MOST - kept.KEPT):
        kept.pin(f"p{i}")
        kept.asked(f"p{i}")
    assert kept.full and kept.idle(lambda name: False) == []
