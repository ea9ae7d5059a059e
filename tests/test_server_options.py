"""Serving options a deployment sets at start: CORS for browser clients (`--allowed-origins`), a
chat template of the user's own (`--chat-template`) and more names for the model
(`--served-model-name`), on one real server behind an API key."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import ROOT, STARTUP_TIMEOUT_S, ServerProcess, free_port

MODEL = "smollm2-135m-instruct"
ALIAS = "gpt-4o-mini"  # a name a client was written for
KEY = "s3cret"
UI = "http://ui.example:3000"
# SmolLM2's turn markers around each message, its content upper-cased, after a preface where a
# request gives one: a prompt its own template (tokenizer_config.json) never renders, so the
# rendered text tells whose template ran.
SHOUTING = ("{% if preface %}{{ preface + '\n' }}{% endif %}"
            "{% for d in documents or [] %}[{{ d['title'] }}: {{ d['text'] }}]\n{% endfor %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PREFLIGHT = {"Origin": UI, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "shouting.jinja"
    template.write_text(SHOUTING)
    s = ServerProcess("--api-key", KEY, "--allowed-origins", f"{UI.upper()}/,https://other.example",
                      "--chat-template", str(template), "--served-model-name", MODEL, ALIAS, MODEL,
                      "--max-model-len", "512", "--max-batch", "4")
    yield s
    s.stop()


def chat(url, headers, **extra):
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                            **extra})


def test_a_preflight_from_an_allowed_origin_is_answered_without_the_key(srv):
    r = httpx.options(srv.url + "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == UI  # as browsers write it: lower case, no trailing slash
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed
    assert "POST" in r.headers["access-control-allow-methods"]


def test_answers_and_refusals_to_an_allowed_origin_carry_its_header(srv):
    ok = chat(srv.url, {"Origin": UI, "Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert ok.headers["access-control-allow-origin"] == UI
    refused = chat(srv.url, {"Origin": UI})  # a page must be able to read why it was refused
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["access-control-allow-origin"] == UI


def test_other_origins_get_no_cors_headers(srv):
    r = httpx.options(srv.url + "/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = chat(srv.url, {"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_without_the_flag_a_server_sends_no_cors_headers(server):
    r = httpx.options(server.url + "/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in r.headers
    r = chat(server.url, {"Origin": UI})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_anthropics_x_api_key_header_is_taken_as_the_key(srv):
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(srv.url + "/v1/messages", json=body, timeout=60).status_code == 401
    assert httpx.post(srv.url + "/v1/messages", json=body, headers={"x-api-key": "wrong"}, timeout=60).status_code == 401
    r = httpx.post(srv.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == 200 and r.json()["type"] == "message"
    assert httpx.get(srv.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_tokenize_detokenize_scoring_and_tgi_paths_are_behind_the_key(srv):
    scored = {"query": "hi", "documents": ["a"]}
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]}),
                       ("/score", {"text_1": "hi", "text_2": "a"}), ("/v1/score", {"text_1": "hi", "text_2": "a"}),
                       ("/rerank", scored), ("/v1/rerank", scored), ("/v2/rerank", scored),
                       ("/invocations", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
                       *((tgi, {"inputs": "hi", "parameters": {"max_new_tokens": 1}})
                         for tgi in ("/generate", "/generate_stream", "/")),
                       ("/chat_tokenize", {"messages": [{"role": "user", "content": "hi"}]})):
        assert httpx.post(srv.url + path, json=body).status_code == 401
        assert httpx.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    refused = httpx.post(srv.url + "/generate", json={"inputs": "hi"})
    assert refused.status_code == 401 and "error_type" not in refused.json()  # (the hub's own HTTP error says it)
    assert httpx.get(srv.url + "/info").status_code == 401
    assert httpx.get(srv.url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()["model_id"] == MODEL


def test_the_users_chat_template_renders_chat_prompts(srv):
    auth = {"Authorization": f"Bearer {KEY}"}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    tokens = httpx.post(srv.url + "/tokenize", json={"messages": messages}, headers=auth).json()["tokens"]
    text = httpx.post(srv.url + "/detokenize", json={"tokens": tokens}, headers=auth).json()["prompt"]
    # /detokenize keeps the special markers, as vLLM's does
    assert text.startswith("<|im_start|>") and \
        text.replace("<|im_start|>", "").replace("<|im_end|>", "") == "system\nBE BRIEF.\nuser\nNAME A COLOUR.\nassistant\n"
    prefaced = httpx.post(srv.url + "/tokenize", headers=auth, json={
        "messages": messages, "chat_template_kwargs": {"preface": "Logged chat."}}).json()["tokens"]
    assert httpx.post(srv.url + "/detokenize", json={"tokens": prefaced}, headers=auth).json()["prompt"] == \
        "Logged chat.\n" + text  # a request's chat_template_kwargs reach the template
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(tokens) and r.choices[0].message.content
    # vLLM's documents reach a template that reads them (RAG templates), on /tokenize as on chat
    documents = [{"title": "Colours", "text": "Red is a colour."}]
    with_documents = httpx.post(srv.url + "/tokenize", headers=auth, json={
        "messages": messages, "documents": documents}).json()["tokens"]
    assert httpx.post(srv.url + "/detokenize", json={"tokens": with_documents}, headers=auth).json()["prompt"] == \
        "[Colours: Red is a colour.]\n" + text
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body={"documents": documents})
    assert r.usage.prompt_tokens == len(with_documents)
    r = httpx.post(srv.url + "/tokenize", headers=auth, json={"prompt": "hi", "documents": documents})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents"


def test_a_template_variable_the_template_cannot_use_is_a_400(srv):
    """The template adds a newline to the preface: a number there fails in the template (a TypeError
    in jinja), which is the request's fault, not the server's."""
    for path, extra in (("/tokenize", {}), ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2})):
        r = httpx.post(srv.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"preface": 7},
                             **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text


@pytest.mark.parametrize("value, message", [
    ("/no/such/template.jinja", "no such file, and not a Jinja template"),
    ("{% for m in messages %}{{ m['content'] }}", "the chat template does not parse: line 1"),
    ("EMPTY", "the file is empty"),  # it was no template at all: chats went out as plain "role: content" lines
    ("BINARY", "not a text file"),
])
def test_a_chat_template_that_cannot_be_used_stops_the_server_with_the_reason(value, message, tmp_path):
    if value in ("EMPTY", "BINARY"):
        (tmp_path / "t.jinja").write_bytes(b"\n" if value == "EMPTY" else b"\xfa\xfb{{ x }}")
        value = str(tmp_path / "t.jinja")
    out = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(free_port()), "--chat-template", value],
                         cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 1 and message in out.stdout + out.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_a_cuda_device_on_a_host_without_one_is_refused_first_thing_in_the_load(tmp_path):
    """It failed deep in the model's build ("AssertionError: Torch not compiled with CUDA enabled"),
    after the dense weights had been written into the cache (23 s and 538 MB for SmolLM2)."""
    out = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(free_port()), "--device", "cuda",
                          "--cache-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 1 and "--device cuda: " in out.stderr and "--device cpu" in out.stderr, out.stderr
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_kv_cache_larger_than_the_memory_is_refused_before_it_is_allocated():
    """`--kv-capacity-tokens 10**12` (or 16 sequences of huge blocks) was allocated and filled until
    the machine ran out, or ended in the allocator's own message naming no flag."""
    out = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(free_port()), "--device", "cpu",
                          "--kv-capacity-tokens", str(10 ** 12)], cwd=ROOT, capture_output=True, text=True,
                         timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 1 and "GiB of host memory available" in out.stderr and "--kv-capacity-tokens" in out.stderr


def test_every_served_name_is_listed_and_answers_as_itself(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL, ALIAS]  # the repeated name listed once
    assert client.models.retrieve(ALIAS).id == ALIAS
    r = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.model == ALIAS and r.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_a_config_files_chat_template_path_is_read_beside_it(tmp_path, monkeypatch):
    from server.config_file import load_config

    (tmp_path / "chat.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "served.yaml").write_text("chat_template: chat.jinja\n")
    (tmp_path / "inline.yaml").write_text("chat_template: \"{{ messages }}\"\n")
    monkeypatch.chdir("/")  # not the config file's folder
    assert load_config(tmp_path / "served.yaml").chat_template == str(tmp_path / "chat.jinja")
    assert load_config(tmp_path / "inline.yaml").chat_template == "{{ messages }}"  # a template stays itself


def test_a_config_files_model_generation_config_and_cache_paths_are_read_beside_it(tmp_path, monkeypatch):
    """As its chat template and adapters are; a bare name the file's folder does not hold stays itself (an
    embedded model's name, generation_config's `auto`)."""
    from server.config_file import load_config

    (tmp_path / "gen").mkdir()
    (tmp_path / "my.gguf").write_bytes(b"")
    (tmp_path / "paths.yaml").write_text("model: ./models/my.gguf\ngeneration_config: gen\ncache_dir: cache\n")
    (tmp_path / "names.yaml").write_text("model: my.gguf\ngeneration_config: auto\ncache_dir: /var/cache/x\n")
    (tmp_path / "embedded.yaml").write_text("model: gemma3-270m\n")
    monkeypatch.chdir("/")  # not the config file's folder
    paths, names = load_config(tmp_path / "paths.yaml"), load_config(tmp_path / "names.yaml")
    assert (paths.model, paths.generation_config, paths.cache_dir) == (
        str(tmp_path / "models/my.gguf"), str(tmp_path / "gen"), str(tmp_path / "cache"))
    assert (names.model, names.generation_config, names.cache_dir) == (str(tmp_path / "my.gguf"), "auto", "/var/cache/x")
    assert load_config(tmp_path / "embedded.yaml").model == "gemma3-270m"


def test_the_model_flag_overrides_a_config_files_model_even_with_a_preset_name(tmp_path):
    from server.cli import build_config, serve_parser

    (tmp_path / "mine.yaml").write_text("model: /models/mine.gguf\nmax_num_seqs: 4\n")
    args = serve_parser().parse_args(["--config", str(tmp_path / "mine.yaml"), "--model", "gemma3-270m"])
    config = build_config(args)
    assert config.model == "gemma3-270m" and config.max_num_seqs == 4
    args = serve_parser().parse_args(["--config", str(tmp_path / "mine.yaml"), "--model", "llama-2-7b-chat-cuda"])
    assert build_config(args).model == "/models/user/llama-2-7b-chat"  # the preset's model, not its name


def test_a_config_file_that_names_no_model_name_serves_its_model_under_its_own(tmp_path):
    """A file with a model and no `served_model_name` served it as smollm2-135m-instruct (the
    default's name), and requests under the model's own name were 404s."""
    from server.cli import build_config, serve_parser

    (tmp_path / "mine.yaml").write_text("model: /models/mistral-7b.Q4_K_M.gguf\nmax_num_seqs: 4\n")
    (tmp_path / "named.yaml").write_text("model: /models/x.gguf\nserved_model_name: chat\n")
    (tmp_path / "none.yaml").write_text("max_num_seqs: 4\n")
    build = lambda *argv: build_config(serve_parser().parse_args(list(argv)))  # noqa: E731
    assert build("--config", str(tmp_path / "mine.yaml")).served_model_name == "mistral-7b.Q4_K_M.gguf"
    assert build("--config", str(tmp_path / "named.yaml")).served_model_name == "chat"
    assert build("--config", str(tmp_path / "none.yaml")).served_model_name == "smollm2-135m-instruct"
    assert build("--config", str(tmp_path / "mine.yaml"), "--model", "/m/other").served_model_name == "other"
    assert build("--config", str(tmp_path / "mine.yaml"), "--model", "gemma3-270m").served_model_name == "gemma3-270m"
    assert build("--config", str(tmp_path / "mine.yaml"), "--served-model-name", "a").served_model_name == "a"


def test_only_a_bare_name_is_a_preset(tmp_path, monkeypatch):
    """`--model ./gemma3-270m` is a folder there, not the preset; a path's own .yaml is no preset."""
    from server.config_file import preset_path

    assert preset_path("gemma3-270m") is not None
    (tmp_path / "mine.yaml").write_text("model: x\n")
    monkeypatch.chdir(tmp_path)
    for name in ("./gemma3-270m", str(tmp_path / "mine"), "../presets/gemma3-270m", "", ".", "a/b"):
        assert preset_path(name) is None, name


@pytest.mark.parametrize("text, message", [
    ("served_model_name: [a, b]\n", "served_model_name must be a string, got ['a', 'b']"),
    ("max_num_seqs: 4.5\n", "max_num_seqs must be an integer"),
    ("skip:\n  threshold: high\n", "skip.threshold must be a number"),
    ("prefix_caching: 1\n", "prefix_caching must be true or false"),
    ("nonsense: 1\n", "unknown keys ['nonsense']"),
    ("- a list\n", "a config file is a mapping of settings"),
    ("device: gpu\n", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("skip:\n  policy: foo\n", "skip.policy must be one of"),
    ("max_num_seqs: [1,\n", "bad.yaml: not YAML"),  # its place read "<unicode string>", no file
    ("block_size: 100000\n", "block_size must be <= 1024"),
    ("lora_modules: [a]\n", "lora_modules maps names to adapter folders (name: path), got ['a']"),
])
def test_a_config_file_with_a_wrong_value_is_a_usage_error_naming_it(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    out = subprocess.run([sys.executable, "-m", "server.cli", "--config", str(tmp_path / "bad.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, env, message", [
    (["--skip-default-budget", "0.6"], {}, "0 <= default_budget <= max_budget <= 1, got 0.6 and 0.5"),
    (["--skip-threshold", "1.5"], {}, "skip.threshold is a cosine, in [-1, 1], got 1.5"),
    (["--max-input-tokens", "2048"], {}, "--max-input-tokens 2048 must be below the context"),
    (["--block-size", "0"], {}, "block_size must be >= 1"),
    (["--port", "70000"], {}, "'70000' is not a port"),
    ([], {"SKIPSERVE_PORT": "abc"}, "$SKIPSERVE_PORT: 'abc' is not a port"),  # (it blamed --port, not given)
    (["--host", ""], {}, "argument --host: empty (0.0.0.0 listens on every interface)"),
    (["--block-size", "100000"], {}, "block_size must be <= 1024"),  # 16 sequences of it: 34 GiB
    (["--kv-cache-memory", "inf"], {}, "kv_cache_memory must be > 0 and finite"),
    (["--api-key", ""], {}, "argument --api-key: empty: leave it out"),  # it served with no key
    (["--api-key", " s3cret "], {}, "argument --api-key: a key is visible ASCII"),  # no client could send it
    (["--api-key", "p\u00e4ssw\u00f6rd"], {}, "argument --api-key: a key is visible ASCII"),
    ([], {"SKIPSERVE_API_KEY": "s3cret\n"}, "$SKIPSERVE_API_KEY: a key is visible ASCII"),
    (["--max-waiting", "-100"], {}, "'-100': at least 0"),  # every request a 429
    (["--max-request-bytes", "0"], {}, "'0': at least 1"),  # every request a 413
    (["--keep-alive-timeout", "-1"], {}, "'-1': at least 0.0"),
    (["--header-timeout", "soon"], {}, "'soon' is not a number"),
    (["--tensor-parallel-size", "2"], {}, "argument --tensor-parallel-size/-tp: invalid choice: 2"),
    (["smollm2-135m-instruct", "--model", "gemma3-270m"], {}, "the model is given twice"),
    (["--lora-modules", "sql"], {}, "'sql': give NAME=PATH"),
    (["--lora-modules", '{"name": "sql"}'], {}, 'a JSON adapter is {"name": ..., "path": ...}'),
    (["--max-lora-rank", "0"], {}, "'0': at least 1"),
    (["--lora-modules", "smollm2-135m-instruct=/"], {}, "LoRA adapter 'smollm2-135m-instruct' has the model's own name"),
])
def test_server_settings_out_of_range_are_usage_errors_before_the_model_loads(flags, env, message):
    """A default budget over the largest one would have failed every request that asks none, with a
    400 blaming the client; a port past 65535 or a port variable that is no number, a traceback."""
    out = subprocess.run([sys.executable, "-m", "server.cli", *flags], cwd=ROOT, capture_output=True, text=True,
                         timeout=STARTUP_TIMEOUT_S, env={**os.environ, **env})
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert "s3cret" not in out.stderr and "ssw" not in out.stderr  # a key is never shown


def test_host_and_port_variables_set_empty_count_as_unset(monkeypatch):
    """A compose file's `SKIPSERVE_HOST: ${HOST}` of an unset HOST: an empty host listened on every
    interface."""
    from server.cli import listen_defaults

    monkeypatch.setenv("SKIPSERVE_HOST", "")
    monkeypatch.setenv("SKIPSERVE_PORT", "")
    assert listen_defaults() == ("127.0.0.1", "8000")


def test_a_port_in_use_ends_the_start_before_the_model_loads_with_the_address():
    """uvicorn binds after its lifespan startup, which begins the load: a taken port was reported
    at once, but the process then waited out the whole load (minutes for a 7B model) to exit."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(port)], cwd=ROOT,
                             capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "skipserve.runner" not in out.stderr  # the runner logs its threads first thing in the load


def test_an_unexpected_error_is_a_500_envelope_that_carries_the_cors_header():
    """No route of the server fails on purpose, so a route that does is added to the real app (its
    middleware stack and handlers; the model is never loaded: the lifespan does not run)."""
    from starlette.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from server.app import create_app

    app = create_app(AsyncEngine(EngineConfig()), (MODEL,), allowed_origins=(UI,))

    async def fails():
        raise RuntimeError("a bug")

    app.add_api_route("/v1/fails", fails, methods=["POST"])
    r = TestClient(app, raise_server_exceptions=False).post("/v1/fails", headers={"Origin": UI})
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal server error",
                                                          "type": "server_error", "param": None, "code": None}
    assert r.headers["access-control-allow-origin"] == UI


def test_the_model_list_waits_for_the_model_as_health_does():
    """Before the model has loaded, /v1/models answers 503 as /health does: a client that polls the
    list before sending requests would otherwise meet 503s on them (vLLM lists only once loaded)."""
    import asyncio

    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from server.app import create_app

    app = create_app(AsyncEngine(EngineConfig()), ("smollm2-135m-instruct",))  # not started: loading

    async def get(path, body=None):
        transport = httpx.ASGITransport(app=app)  # no lifespan: the engine never starts loading
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await (client.get(path) if body is None else client.post(path, json=body))

    chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}
    for path, body in (("/health", None), ("/v1/models", None), ("/v1/chat/completions", chat),
                       ("/tokenize", {"prompt": "Hi"})):  # (every route names the wait alike)
        r = asyncio.run(get(path, body))
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading", (path, r.text)


def test_the_priority_policy_serves_a_waiting_request_by_its_priority(server):
    """`--scheduling-policy priority` with one row: while a long answer runs, two requests of
    priority 5 and then one of -1 queue; the -1 is served first, then the others in arrival order.
    Under the default fcfs policy a priority is a 400 naming it, as vLLM answers it."""
    import threading
    import time

    def body(priority, max_tokens, stream=False):
        return {"model": MODEL, "prompt": "Count slowly:", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "priority": priority, "stream": stream}

    refused = httpx.post(server.url + "/v1/completions", json=body(1, 2), timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
    assert httpx.post(server.url + "/v1/completions", json=body(0, 2), timeout=30).status_code == 200
    # started with the spellings of a command written for `vllm serve` too (the model as its positional
    # argument, flags this server takes as it means them)
    srv = ServerProcess(MODEL, "--scheduling-policy", "priority", "--max-num-seqs", "1", "--max-model-len", "512",
                        "--enable-prefix-caching", "--max-num-batched-tokens", "256", "--trust-remote-code", "-tp", "1",
                        "--enable-chunked-prefill", "--enable-auto-tool-choice", "--uvicorn-log-level", "info")
    try:
        done, threads = [], []

        def send(name, priority):
            # 16 tokens each: one answer runs a good many milliseconds after another's has come back
            r = httpx.post(srv.url + "/v1/completions", json=body(priority, 16), timeout=120)
            assert r.status_code == 200, r.text
            done.append(name)

        with httpx.stream("POST", srv.url + "/v1/completions", json=body(0, 400, stream=True), timeout=120) as long:
            lines = long.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it runs: the one row is taken
            for name, priority in (("later", 5), ("later2", 5), ("urgent", -1)):
                threads.append(threading.Thread(target=send, args=(name, priority)))
                threads[-1].start()
                time.sleep(0.2)  # (in this order)
            assert srv.metric("num_requests_waiting") == 3  # all queued behind the long answer
            for _ in lines:  # the long answer to its end
                pass
        for t in threads:
            t.join(timeout=120)
        assert done == ["urgent", "later", "later2"]
    finally:
        srv.stop()
