"""The sampling a model's makers recommend as the defaults of requests that leave it out
(engine/generation_defaults.py, vLLM's --generation-config and --override-generation-config): read
from a folder's generation_config.json or a GGUF's general.sampling keys, checked at start, and
applied by the OpenAI routes only, on a real server."""
from __future__ import annotations

import json

import httpx
import pytest

from engine.generation_defaults import sampling_defaults
from engine.loader import embedded_gguf, ensure_hf_dir
from tests.conftest import ServerProcess, cpu_path_only
from tests.tiny_gguf import write_tiny_gguf

MODEL = "smollm2-135m-instruct"
QWEN3_STYLE = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1, 2],
               "transformers_version": "4.51.0"}


def folder(tmp_path, config: dict, name: str = "model"):
    path = tmp_path / name
    path.mkdir()
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def test_a_folders_generation_config_gives_the_sampling_keys_vllm_takes(tmp_path):
    model = folder(tmp_path, QWEN3_STYLE | {"max_new_tokens": 512, "num_beams": 1})
    assert sampling_defaults(model) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 512}
    assert sampling_defaults(model, "vllm") == {}  # OpenAI's defaults
    other = folder(tmp_path, {"temperature": 0.2}, "other")
    assert sampling_defaults(model, str(other)) == {"temperature": 0.2}
    assert sampling_defaults(model, "auto", {"temperature": 0.9, "min_p": 0.05}) == \
        {"temperature": 0.9, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "max_tokens": 512}
    assert sampling_defaults(model, "vllm", {"repetition_penalty": 1.1}) == {"repetition_penalty": 1.1}
    assert sampling_defaults(tmp_path) == {}  # a folder without one


@pytest.mark.parametrize("given, message", [
    ({"temperature": 3.0}, "temperature must be in [0, 2]"),  # every request left without one would be a 400
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_k": 2.5}, "a whole number"),
    ({"temperature": "0.7"}, "a number"),
    ({"max_new_tokens": 0}, "max_tokens must be at least 1"),
])
def test_a_default_no_request_could_take(tmp_path, given, message, caplog):
    """The model's own is left out with a warning (the model still serves, as vLLM and llama-server
    start); one the server is given (another folder's, the override's) stops the start, named."""
    model = folder(tmp_path, given | {"min_p": 0.1})
    assert sampling_defaults(model) == {"min_p": 0.1} and message in caplog.text
    pattern = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises(ValueError, match=pattern):
        sampling_defaults(tmp_path, str(model))
    with pytest.raises(ValueError, match=pattern):
        sampling_defaults(tmp_path, "vllm", given)


def test_overrides_vllm_would_read_past_are_left_out_with_a_warning(tmp_path, caplog):
    """vLLM reads only its sampling keys out of an override: the others (and nulls) are left out."""
    assert sampling_defaults(tmp_path, "auto", {"do_sample": True, "temperature": 0.5, "top_p": None}) == \
        {"temperature": 0.5}
    assert "do_sample, top_p left out" in caplog.text
    with pytest.raises(ValueError, match="a folder holding generation_config.json"):
        sampling_defaults(tmp_path, str(tmp_path / "none"))
    with pytest.raises(ValueError, match="a mapping"):
        sampling_defaults(tmp_path, "auto", ["temperature"])


def test_a_ggufs_sampling_keys_become_its_folders_generation_config(tmp_path):
    """llama.cpp's general.sampling keys (temp, top_k, top_p, min_p, penalty_repeat), as a GGUF
    carries its makers' sampling, read into the folder the engine loads from."""
    keys = {"temp": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0, "penalty_repeat": 1.05, "mirostat": 0}
    path = write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", embedded_gguf(MODEL), sampling=keys)
    defaults = sampling_defaults(ensure_hf_dir(str(path), str(tmp_path / "cache"), dense=False))
    assert defaults == {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0, "repetition_penalty": 1.05}
    # values that are transformers' own defaults too (its save leaves those out): kept all the same
    usual = {"temp": 1.0, "top_k": 50, "top_p": 1.0, "penalty_repeat": 1.0}
    path = write_tiny_gguf(tmp_path / "usual.gguf", "qwen2", embedded_gguf(MODEL), sampling=usual)
    assert sampling_defaults(ensure_hf_dir(str(path), str(tmp_path / "cache"), dense=False)) == \
        {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
    plain = write_tiny_gguf(tmp_path / "plain.gguf", "qwen2", embedded_gguf(MODEL))
    assert sampling_defaults(ensure_hf_dir(str(plain), str(tmp_path / "cache"), dense=False)) == {}


@pytest.fixture(scope="module")
def srv():
    """Defaults the embedded model's own file does not carry: greedy, five tokens, a repetition
    penalty no request here asks for."""
    s = ServerProcess("--override-generation-config",
                      '{"temperature": 0, "max_new_tokens": 5, "repetition_penalty": 2.0}', "--max-model-len", "160")
    yield s
    s.stop()


def post(srv, path: str, body: dict) -> dict:
    r = httpx.post(srv.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_routes_take_the_defaults_and_the_cap(srv):
    """The sampling a request leaves out (or sends as null) is the server's; the generation config's
    max_new_tokens caps every answer, whatever the request asks (vLLM's rule): a chat's own 3 stays
    3, its 7 becomes 5, completions' default 16 becomes 5."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Count from one to twenty."}]}
    left_out = post(srv, "/v1/chat/completions", chat)
    assert left_out["usage"]["completion_tokens"] == 5 and left_out["choices"][0]["finish_reason"] == "length"
    assert post(srv, "/v1/chat/completions", chat | {"max_tokens": 3})["usage"]["completion_tokens"] == 3
    assert post(srv, "/v1/chat/completions", chat | {"max_completion_tokens": 7})["usage"]["completion_tokens"] == 5
    nulls = post(srv, "/v1/chat/completions", chat | {"max_tokens": None, "temperature": None})
    assert nulls["usage"]["completion_tokens"] == 5
    completion = post(srv, "/v1/completions", {"model": MODEL, "prompt": "1, 2, 3,"})
    assert completion["usage"]["completion_tokens"] == 5  # (OpenAI's default would be 16)
    response = post(srv, "/v1/responses", {"model": MODEL, "input": "Count from one to twenty."})
    assert response["usage"]["output_tokens"] == 5 and response["temperature"] == 0.0
    message = post(srv, "/v1/messages", {"model": MODEL, "max_tokens": 40,
                                         "messages": [{"role": "user", "content": "Count from one to twenty."}]})
    assert message["usage"]["output_tokens"] == 5 and message["stop_reason"] == "max_tokens"
    invoked = post(srv, "/invocations", chat)
    assert invoked["usage"]["completion_tokens"] == 5


def test_the_cap_never_refuses_a_long_prompt(srv):
    """A chat whose prompt leaves less room than the cap is answered within the room (its own
    max_tokens past it is refused, as before): the cap is not a max_tokens the client sent."""
    def chat(words: int) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "one" + " one" * words}]}

    size = lambda body: httpx.post(srv.url + "/tokenize", json=body, timeout=30).json()["count"]  # noqa: E731
    long_chat = chat(157 - size(chat(0)))
    assert size(long_chat) == 157  # 3 tokens of room in the 160-token context
    answer = post(srv, "/v1/chat/completions", long_chat)
    assert answer["usage"]["completion_tokens"] <= 3
    asked = httpx.post(srv.url + "/v1/chat/completions", json=long_chat | {"max_tokens": 4}, timeout=60)
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "max_tokens"


@cpu_path_only
def test_a_default_temperature_samples_as_the_same_temperature_given(srv):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "seed": 3}
    given = post(srv, "/v1/chat/completions", chat | {"temperature": 0.0, "max_tokens": 5})
    assert post(srv, "/v1/chat/completions", chat)["choices"][0]["message"] == given["choices"][0]["message"]


def test_tgi_routes_keep_tgis_defaults_and_llama_cpps_take_the_sampling_not_the_cap(srv):
    """TGI's clients were written for its defaults: no cap of five tokens (as many as the context
    leaves, as TGI answers), no repetition penalty where the request names none (the same answer as
    one that asks for none). llama.cpp's /completion samples with the model's settings where it has
    them, as llama-server takes a GGUF's (here the server's: its penalty), but keeps n_predict's cap."""
    prompt = "1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"
    tgi = post(srv, "/generate", {"inputs": prompt, "parameters": {"details": True}})
    assert tgi["details"]["generated_tokens"] > 5
    unpenalized = post(srv, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 8}})["generated_text"]
    assert post(srv, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 8, "repetition_penalty": 1.0}}
                )["generated_text"] == unpenalized
    llama = post(srv, "/completion", {"prompt": prompt})
    assert llama["tokens_predicted"] > 5
    taken = post(srv, "/completion", {"prompt": prompt, "n_predict": 8})["content"]  # (temperature 0: the server's)
    assert taken == post(srv, "/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0,
                                              "repeat_penalty": 2.0})["content"]
    assert taken != post(srv, "/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0,
                                              "repeat_penalty": 1.0})["content"]
    props = httpx.get(srv.url + "/props", timeout=30).json()["default_generation_settings"]["params"]
    assert (props["temperature"], props["repeat_penalty"], props["top_k"], props["n_predict"]) == (0.0, 2.0, 40, -1)
    # (the OpenAI routes take the server's penalty: their answer differs from one that asks for none)
    penalized = post(srv, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8})["choices"][0]["text"]
    assert penalized != post(srv, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                                      "repetition_penalty": 1.0})["choices"][0]["text"]
