"""Commands written for other servers (`vllm serve`, Hugging Face's text-generation-launcher,
llama.cpp's llama-server), read as those servers mean them (server/launcher_flags.py): parsed
into this server's settings, and one llama-server command line serving for real."""
from __future__ import annotations

import json

import httpx
import pytest

from server.cli import build_config, serve_parser
from server.launcher_flags import max_waiting
from tests.conftest import ServerProcess


def build(*argv):
    return build_config(serve_parser().parse_args(list(argv)))


def test_a_command_written_for_vllm_serve_is_read_as_vllm_means_it():
    """The model as the first argument (a preset by name, or a path), and vLLM's spellings of the
    prefix cache and prefill budget flags."""

    gemma = build("gemma3-270m")
    assert gemma.served_model_name == "gemma3-270m" and gemma.model == build("--model", "gemma3-270m").model
    assert build("/models/x.gguf", "--max-num-seqs", "4").model == "/models/x.gguf"
    assert build("--no-enable-prefix-caching").prefix_caching is False
    assert build("--no-prefix-caching", "--no-enable-prefix-caching").prefix_caching is False
    with pytest.raises(SystemExit):  # two spellings saying otherwise: a usage error, not the last one taken
        build("--no-prefix-caching", "--enable-prefix-caching")
    assert build("--max-num-batched-tokens", "256").max_prefill_tokens == 256
    with pytest.raises(ValueError, match="the model is given twice"):
        build("gemma3-270m", "--model", "/models/x.gguf")


def test_vllms_speculative_config_is_n_gram_speculation(capsys):
    ngram = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
    assert build("--speculative-config", ngram).speculative_tokens == 4
    assert build("--speculative-config", '{"model": "[ngram]", "num_speculative_tokens": 3}').speculative_tokens == 3
    assert build("--speculative-config", ngram, "--speculative-tokens", "4").speculative_tokens == 4
    with pytest.raises(ValueError, match="the draft tokens are given twice"):
        build("--speculative-config", ngram, "--speculative-tokens", "2")
    for bad, words in (('{"method": "eagle", "model": "x", "num_speculative_tokens": 2}', "only n-gram"),
                       ('{"method": "ngram"}', "num_speculative_tokens"),
                       ('{"method": "ngram", "model": "org/draft", "num_speculative_tokens": 2}', "only n-gram"),
                       ('{"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}',
                        "draft_tensor_parallel_size"),
                       ("ngram", "not JSON")):
        with pytest.raises(SystemExit):
            serve_parser().parse_args(["--speculative-config", bad])
        assert words in capsys.readouterr().err


def test_a_command_written_for_tgis_launcher_is_read_as_tgi_means_it():
    """text-generation-launcher's spellings of the model, the context, the batch, the prefill
    budget, the host, the body limit, one shard and CUDA graphs off."""

    args = serve_parser().parse_args(["--model-id", "gemma3-270m", "--max-total-tokens", "512", "--max-batch-size",
                                      "4", "--max-batch-prefill-tokens", "128", "--hostname", "0.0.0.0",
                                      "--payload-limit", "4096", "--num-shard", "1", "--cuda-graphs", "0"])
    config = build_config(args)
    assert (config.served_model_name, config.max_model_len, config.max_num_seqs, config.max_prefill_tokens) == \
        ("gemma3-270m", 512, 4, 128)
    assert config.enforce_eager is True and args.host == "0.0.0.0" and args.max_request_bytes == 4096
    plain = serve_parser().parse_args([])
    assert build_config(serve_parser().parse_args(["--cuda-graphs", "1,2,4"])).enforce_eager is not True
    assert plain.host is None and plain.max_request_bytes > 4096  # (the host: $SKIPSERVE_HOST's or loopback, at start)
    for bad in (["--num-shard", "2"], ["--cuda-graphs", "all"]):
        with pytest.raises(SystemExit):
            serve_parser().parse_args(bad)
    # one setting in two servers' spellings: the same value taken, two values refused (not the last one silently)
    assert build("--model-id", "gemma3-270m", "--model", "gemma3-270m").served_model_name == "gemma3-270m"
    assert build("-m", "/models/x.gguf", "/models/x.gguf").model == "/models/x.gguf"
    for twice, what in ((["--model", "gemma3-270m", "--model-id", "/models/b.gguf"], "the model"),
                        (["-m", "/models/a.gguf", "--model", "/models/b.gguf"], "the model"),
                        (["--host", "0.0.0.0", "--hostname", "1.2.3.4"], "the host")):
        with pytest.raises(ValueError, match=f"{what} is given twice"):
            build(*twice)
    both = serve_parser().parse_args(["--host", "::", "--hostname", "::"])
    build_config(both)
    assert both.host == "::"


def test_tgis_concurrent_request_limit_is_the_batch_and_queue_together():
    """--max-concurrent-requests N: at most N sequences in the server, a batch of at most N and the
    rest queued; beside --max-waiting it would be said twice."""
    for limit, batch, queue in ((8, 8, 0), (100, 16, 84)):
        args = serve_parser().parse_args(["--max-concurrent-requests", str(limit)])
        config = build_config(args)
        queue_left = max_waiting(args, config, 64)  # (the batch capped in `config`)
        assert (config.max_num_seqs, queue_left) == (batch, queue)
    plain = serve_parser().parse_args(["--max-waiting", "3"])
    assert max_waiting(plain, build_config(plain), 64) == 3
    both = serve_parser().parse_args(["--max-concurrent-requests", "8", "--max-waiting", "3"])
    with pytest.raises(ValueError, match="leave --max-waiting out"):
        max_waiting(both, build_config(both), 64)


def test_llama_servers_slots_context_and_cache_types_are_read_as_it_means_them():
    """-c is the KV cache's tokens, split over -np slots unless -kvu; -ngl picks the device; one
    cache type for K and V, f16 where one is not given (llama-server's default); the sampling flags
    are requests' defaults (the generation config's override)."""
    split = build("-m", "/models/x.gguf", "-c", "8192", "-np", "4", "-t", "3", "-b", "256")
    assert (split.model, split.kv_capacity_tokens, split.max_model_len, split.max_num_seqs, split.threads,
            split.max_prefill_tokens) == ("/models/x.gguf", 8192, 2048, 4, 3, 256)
    assert build("-c", "8192", "-np", "4", "-kvu").max_model_len == 8192
    assert build("-c", "8192").max_model_len == 8192  # no slots given: llama-server's one pool (auto)
    assert build("-c", "0").max_model_len == build().max_model_len and build("-c", "0").kv_capacity_tokens is None
    assert build("-np", "-1").max_num_seqs == build().max_num_seqs
    # (a GPU layer count: the GPU where there is one, as llama-server without a GPU backend runs on the CPU)
    assert [build("-ngl", n).device for n in ("0", "99", "all", "auto", "-1")] == ["cpu"] + ["auto"] * 4
    assert build("-ngl", "99", "--device", "cuda").device == "cuda"
    assert build("-t", "0").threads is None and build("-t", "-1").threads is None
    assert build("-ctk", "q8_0", "-ctv", "q8_0").kv_cache_dtype == "int8"
    assert build("--device", "cuda", "-ctk", "f16", "-ctv", "f16").kv_cache_dtype == "auto"  # (16-bit there)
    assert build("-ctk", "f16").kv_cache_dtype == "float16" and build("-ctv", "f32", "-ctk", "f32").kv_cache_dtype \
        == "float32"
    assert build("--no-cache-prompt").prefix_caching is False
    assert build("-a", "local,smol").served_model_name == "local"
    for bad, message in ((["-ctk", "q8_0"], "-ctk q8_0 and -ctv f16 differ"),
                         (["-np", "4", "--max-batch", "8"], "the batch is given twice"),
                         (["-ngl", "0", "--device", "cuda"], "0 runs on the CPU"),
                         (["-ngl", "99", "--device", "cpu"], "puts layers on a GPU"),
                         (["--device", "cuda", "-ctk", "q8_0", "-ctv", "q8_0"], "a CPU cache type"),
                         (["-a", "x", "--served-model-name", "y"], "names are given twice"),
                         (["-c", "3", "-np", "4"], "leaves none to a slot")):
        with pytest.raises(ValueError, match=message):
            build(*bad)
    sampling = build("--temp", "0.7", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--repeat-penalty", "1.1",
                     "--override-generation-config", '{"max_new_tokens": 64}')
    assert sampling.override_generation_config == {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.01,
                                                   "repetition_penalty": 1.1, "max_new_tokens": 64}
    with pytest.raises(ValueError, match="temperature is given twice"):
        build("--temp", "0.3", "--override-generation-config", '{"temperature": 0.5}')
    with pytest.raises(ValueError, match="temperature must be in"):
        build("--temp", "3")
    for bad in (["-np", "0"], ["-ctk", "q4_0"], ["-ngl", "half"], ["-a", "x,,y"], ["-fa", "maybe"],
                ["-tb", "4"], ["-md", "draft.gguf"], ["-cram", "0"]):  # (not -t b, -m d, -c ram)
        with pytest.raises(SystemExit):
            serve_parser().parse_args(bad)


def test_a_llama_server_command_line_serves_as_llama_server_would():
    """The command the README runs llama-server with, pointed at this server: two slots of half the
    4,096-token context each, a q8_0 cache (a CPU one: -ngl 0 keeps a CUDA host's server on its CPU),
    the model under both aliases."""
    from engine.loader import embedded_gguf

    srv = ServerProcess("-m", str(embedded_gguf("smollm2-135m-instruct")), "-c", "4096", "-np", "2", "-t", "1",
                        "-ngl", "0", "-a", "local,smol", "-ctk", "q8_0", "-ctv", "q8_0", "--jinja", "-fa", "on", "-cb",
                        "--metrics", "--no-webui", "--repeat-penalty", "1.3", "--reasoning-format", "deepseek",
                        env={"LLAMA_API_KEY": "k1,k2"})  # llama-server's variable, its keys separated by commas
    try:
        assert httpx.get(srv.url + "/props", timeout=30).status_code == 401
        key = {"Authorization": "Bearer k2"}
        props = httpx.get(srv.url + "/props", timeout=30, headers=key).json()
        assert (props["default_generation_settings"]["n_ctx"], props["total_slots"], props["model_alias"]) == \
            (2048, 2, "local")
        models = httpx.get(srv.url + "/v1/models", timeout=30, headers={"x-api-key": "k1"}).json()["data"]
        assert [m["id"] for m in models] == ["local", "smol"]
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers=key, json={
            "model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        r = httpx.post(srv.url + "/completion", timeout=60, headers=key, json={"prompt": "a b c", "n_predict": 1})
        assert r.json()["generation_settings"]["repeat_penalty"] == 1.3  # the server's, as applied (it read 1.0)
        log = srv.log_path.read_text()
        assert "= 4096 tokens" in log and "(int8)" in log, srv.log_tail()
    finally:
        srv.stop()


def test_vllms_logging_and_docs_flags():
    """--disable-fastapi-docs hides the API's description; --disable-uvicorn-access-log writes no
    line per request; the request and stats logging flags are taken (nothing of the kind is logged)."""
    srv = ServerProcess("--disable-fastapi-docs", "--disable-uvicorn-access-log", "--disable-log-requests",
                        "--disable-log-stats", "--download-dir", "/nowhere", "--swap-space", "4")
    try:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(srv.url + path, timeout=30).status_code == 404, path
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "hi"}, timeout=30).status_code == 200
        assert '"POST /tokenize HTTP/1.1" 200' not in srv.log_path.read_text()
    finally:
        srv.stop()
    plain = ServerProcess()
    try:
        assert httpx.get(plain.url + "/openapi.json", timeout=30).status_code == 200
        assert httpx.post(plain.url + "/tokenize", json={"prompt": "hi"}, timeout=30).status_code == 200
        assert '"POST /tokenize HTTP/1.1" 200' in plain.log_path.read_text()  # (what the flag leaves out)
    finally:
        plain.stop()


def test_lora_adapters_as_vllm_and_tgi_name_them(tmp_path):
    """vLLM's --lora-modules (NAME=PATH or JSON, repeatable, beside --enable-lora, --max-lora-rank and
    --max-loras) and TGI's comma-separated --lora-adapters add up; a config file's folders are found
    beside it; a folder that does not exist stops the start."""
    x, y, z, v, w, c, sql = (tmp_path / name for name in ("x", "y", "z", "v", "w", "c", "adapters/sql"))
    for folder in (x, y, z, v, w, c, sql):
        folder.mkdir(parents=True)
    config = build("--enable-lora", "--lora-modules", f"a={x}", json.dumps({"name": "b", "path": str(y),
                                                                            "base_model_name": "m"}),
                   "--lora-modules", f"c={z}", "--lora-adapters", f"d={v},e={w}", "--max-lora-rank", "64",
                   "--max-loras", "4")
    assert config.lora_modules == {"a": str(x), "b": str(y), "c": str(z), "d": str(v), "e": str(w)}
    assert config.max_lora_rank == 64
    (tmp_path / "c.yaml").write_text("lora_modules:\n  sql: adapters/sql\n")
    config = build("--config", str(tmp_path / "c.yaml"), "--lora-modules", f"chat={c}")
    assert config.lora_modules == {"sql": str(sql), "chat": str(c)}
    assert build().lora_modules == {} and build().max_lora_rank is None
    with pytest.raises(ValueError, match="LoRA adapter /nowhere: no such file or folder"):
        build("--lora-modules", "a=/nowhere")
    with pytest.raises(ValueError, match="the adapter name 'a' is given twice"):
        build("--lora-modules", f"a={x}", f"a={y}")
    for bad in (["--lora-adapters", "predibase/customer_support"], ["--max-loras", "0"]):
        with pytest.raises(SystemExit):
            serve_parser().parse_args(bad)


def test_llama_servers_lora_flags(tmp_path):
    """--lora FNAME[,FNAME] and --lora-scaled FNAME:SCALE[,...] (or the older FNAME SCALE), in order,
    each [file, scale], after a config file's (found beside it)."""
    a, b, c, d, x = (tmp_path / f"{name}.gguf" for name in "abcdx")
    for path in (a, b, c, d, x):
        path.write_bytes(b"GGUF")
    config = build("--lora", str(a), "--lora-scaled", str(b), "0.5", "--lora", f"{c},{d}",
                   "--lora-scaled", f"{a}:0.25,{d}:-1")
    assert config.default_loras == [[str(a), 1.0], [str(b), 0.5], [str(c), 1.0], [str(d), 1.0], [str(a), 0.25],
                                    [str(d), -1.0]]
    assert build().default_loras == []
    assert build("--lora", f"{a},{b}", "--lora-init-without-apply").default_loras == [[str(a), 0.0], [str(b), 0.0]]
    (tmp_path / "c.yaml").write_text("default_loras: [[x.gguf, 0.25]]\n")
    assert build("--config", str(tmp_path / "c.yaml"), "--lora", str(a)).default_loras == \
        [[str(x), 0.25], [str(a), 1.0]]
    (tmp_path / "nan.yaml").write_text("default_loras: [[x.gguf, .nan]]\n")
    with pytest.raises(ValueError, match="a scale from -100 to 100"):
        build("--config", str(tmp_path / "nan.yaml"))
    with pytest.raises(ValueError, match="a scale from -100 to 100"):
        build("--lora-scaled", f"{a}:150")
    for bad in (["--lora-scaled", "b.gguf", "half"], ["--lora-scaled", "b.gguf", "nan"], ["--lora-scaled", "b.gguf"],
                ["--lora-scaled", "b.gguf:x"], ["--lora-scaled", "a:1", "b:2", "c:3"]):
        with pytest.raises(SystemExit):
            serve_parser().parse_args(bad)


@pytest.mark.parametrize("argv, words", [
    (["--max-model-len", "512", "--max-total-tokens", "1024"], "--max-model-len 512 and --max-total-tokens 1024"),
    (["--threads", "1", "-t", "2"], "--threads 1 and -t 2"),
    (["--no-enable-prefix-caching", "--cache-prompt"], "--no-enable-prefix-caching and --cache-prompt"),
    (["--chat-template", "a.jinja", "--chat-template-file", "b.jinja"], "--chat-template 'a.jinja' and"),
    (["--max-request-bytes", "100", "--payload-limit", "1000"], "--max-request-bytes 100 and --payload-limit 1000"),
])
def test_one_setting_in_two_spellings_with_two_values_is_a_usage_error(argv, words, capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(argv)
    assert f"one setting given twice with two values: {words}" in capsys.readouterr().err


def test_one_setting_in_two_spellings_with_one_value_is_taken():
    args = serve_parser().parse_args(["--max-model-len", "512", "--max-total-tokens", "512", "-np", "2", "--parallel",
                                      "2", "--no-prefix-caching", "--no-cache-prompt"])
    assert (args.max_model_len, args.parallel, args.prefix_caching) == (512, 2, False)


@pytest.mark.parametrize("flag", ["--keep", "--max-model", "--served"])
def test_a_long_flag_is_known_by_its_whole_name(flag, capsys):
    """argparse took a prefix: llama-server's `--keep 32` was --keep-alive-timeout 32."""
    with pytest.raises(SystemExit):
        serve_parser().parse_args([flag, "32"])
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_api_keys_come_from_the_flag_several_at_once_or_from_vllms_and_llama_servers_variables(monkeypatch):
    from server.cli import api_keys_given

    parser = serve_parser()
    for name in ("SKIPSERVE_API_KEY", "VLLM_API_KEY", "LLAMA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert api_keys_given(parser.parse_args([]), parser) == (None, None)
    assert api_keys_given(parser.parse_args(["--api-key", "k1", "k2,k3"]), parser) == (("k1", "k2", "k3"), None)
    monkeypatch.setenv("LLAMA_API_KEY", "l1,l2")
    assert api_keys_given(parser.parse_args([]), parser) == (("l1", "l2"), "LLAMA_API_KEY")
    monkeypatch.setenv("VLLM_API_KEY", "v1")
    assert api_keys_given(parser.parse_args([]), parser) == (("v1",), "VLLM_API_KEY")
    monkeypatch.setenv("SKIPSERVE_API_KEY", "s1")
    assert api_keys_given(parser.parse_args([]), parser) == (("s1",), "SKIPSERVE_API_KEY")
    assert api_keys_given(parser.parse_args(["--api-key", "f1"]), parser) == (("f1",), None)
    monkeypatch.setenv("SKIPSERVE_API_KEY", "a,,b")
    with pytest.raises(SystemExit):
        api_keys_given(parser.parse_args([]), parser)


def test_llama_servers_reasoning_format_and_uvicorns_trace_level():
    assert serve_parser().parse_args(["--uvicorn-log-level", "trace"]).log_level == "trace"
    args = serve_parser().parse_args(["--reasoning-format", "deepseek"])
    build_config(args)
    assert args.reasoning_parser == "qwen3"
    with pytest.raises(ValueError, match="say otherwise"):
        build_config(serve_parser().parse_args(["--reasoning-format", "none", "--reasoning-parser", "deepseek_r1"]))
