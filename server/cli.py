"""`skipserve` command line: serve (default) and calibrate."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import replace

from engine.config import KV_CACHE_DTYPES, SCHEDULING_POLICIES, EngineConfig
from server import launcher_flags
from server.cli_types import allowed_origins, api_keys, at_least, host, json_object, lora_module, port
from server.reasoning import PARSERS as REASONING_PARSERS
from server.template_tools import PARSERS as TOOL_CALL_PARSERS

DEFAULT_PRESET = "smollm2-135m-instruct"
DEFAULT_MAX_WAITING = 64  # sequences queued beyond the batch
# where the API key comes from without --api-key, the first set: ours, vLLM's, llama-server's
API_KEY_VARIABLES = ("SKIPSERVE_API_KEY", "VLLM_API_KEY", "LLAMA_API_KEY")


def listen_defaults() -> tuple[str, str]:
    """--host and --port when not given: $SKIPSERVE_HOST and $SKIPSERVE_PORT, else loopback:8000; a
    variable set empty (a compose file's `${HOST}` of an unset one) counts as unset: an empty host
    listened on every interface (server/healthcheck.py reads a running server's address with them too)."""
    return os.environ.get("SKIPSERVE_HOST") or "127.0.0.1", os.environ.get("SKIPSERVE_PORT") or "8000"


def api_keys_given(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[tuple[str, ...] | None, str | None]:
    """The API keys (None: no key) and the variable they came from (None: --api-key, or none): each
    --api-key's keys, else the first of API_KEY_VARIABLES set (vLLM's and llama-server's, as they
    read them: a server started for them with a key must not serve without one)."""
    if args.api_key:
        return tuple(key for given in args.api_key for key in given), None
    variable = next((name for name in API_KEY_VARIABLES if os.environ.get(name)), None)
    if variable is None:
        return None, None
    try:
        return api_keys(os.environ[variable]), variable
    except argparse.ArgumentTypeError as exc:
        parser.error(f"${variable}: {exc}")


def serve_parser() -> argparse.ArgumentParser:
    """Flags left unset (None) take the preset's or config file's value; the help shows the
    embedded preset's values, so `--help` tells what a plain `skipserve` runs with."""
    from server.body_limit import DEFAULT_MAX_REQUEST_BYTES
    from server.config_file import load_config, preset_path

    preset, plain = load_config(preset_path(DEFAULT_PRESET)), EngineConfig()

    def shown(value) -> str:
        return f"(preset default: {value})"

    p = launcher_flags.Parser(
        prog="skipserve",
        description="Serve a model with an OpenAI-compatible API and adaptive FFN skipping. "
                    "`skipserve calibrate --help` for the calibration tool.",
        epilog=f"'preset default' values are the {DEFAULT_PRESET} preset's, what a plain `skipserve` runs with; "
               "a preset name or --config FILE takes that file's values, and a model path without --config "
               f"starts from the engine's own defaults (engine/config.py: threshold {plain.skip.threshold}, cold "
               f"layers {plain.skip.cold_start} and {plain.skip.cold_end}, max_model_len {plain.max_model_len}).")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="preset name (server/presets/NAME.yaml), path to a .gguf file, or a local HF folder "
                        f"(default: the embedded {DEFAULT_PRESET})")
    m.add_argument("--config", default=None, help="YAML config file (as server/presets/*.yaml); flags override it")
    m.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model's name in the API; with more names, requests may use any of them, and "
                        f"/v1/models lists each {shown(preset.served_model_name)}")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help=shown(preset.device))
    m.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="weights: auto = a GGUF's own quantization on CPU (other inputs: float32), bfloat16 "
                        f"on CUDA; float32 / bfloat16 dequantize a GGUF {shown(preset.dtype)}")
    m.add_argument("--quantize", choices=["int8"], default=None,
                   help="CPU: round dense weights (HF safetensors, or a GGUF with --dtype float32) to int8 per "
                        "group of 32 inputs, weight-only, for the quantized kernels (default: off)")
    m.add_argument("--cache-dir", default=None, help="where converted GGUF weights and compiled kernels are "
                   "cached (default: $SKIPSERVE_CACHE or ~/.cache/skipserve)")
    m.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one, to use instead of the model's own "
                        "(as transformers' apply_chat_template renders it) (default: the model's)")
    m.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS), default=None,
                   help="chat answers' thinking (<think>...</think>) as message.reasoning_content apart from the "
                        "content, as vLLM's parsers of these names: qwen3 (an answer that opens with <think>), "
                        "deepseek_r1 (the prompt opens it), gpt_oss or openai_gptoss (harmony's analysis channel) "
                        "(default: gpt_oss for a template that writes harmony, else none: thinking stays in the "
                        "content)")
    m.add_argument("--tool-call-parser", choices=list(TOOL_CALL_PARSERS), default="auto",
                   help="how the model is shown tools and writes calls: hermes (the chat template renders the tools, "
                        "calls come in <tool_call> tags: Qwen2.5, Qwen3, Hermes), llama3_json (the template renders "
                        "them, a call is {\"name\", \"parameters\"} JSON: Llama 3.1-3.3), mistral (the template "
                        "renders them, calls follow [TOOL_CALLS]: Mistral 7B v0.3, Nemo, Small), openai (harmony's "
                        "messages to functions.NAME: gpt-oss), json (a system "
                        "message lists the tools, a call is {\"name\", \"arguments\"} JSON), auto (the format the "
                        "template asks for, else json) (default: auto)")
    m.add_argument("--generation-config", default=None, metavar="auto|vllm|FOLDER",
                   help="the sampling requests take where they leave it out (temperature, top_p, top_k, min_p, "
                        "repetition_penalty; max_new_tokens caps every answer), as vLLM: auto = the model's "
                        "generation_config.json (a GGUF's general.sampling keys); vllm = none, OpenAI's defaults; "
                        "or a folder holding a generation_config.json. On the OpenAI and Anthropic routes; "
                        "llama.cpp's take the sampling, not the cap; TGI's keep TGI's defaults (default: auto)")
    m.add_argument("--override-generation-config", type=json_object, default=None, metavar="JSON",
                   help="defaults over the generation config's, e.g. '{\"temperature\": 0.5}' (with vllm: these only)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads for the kernels (default: the CPUs in the affinity mask, "
                        "capped at a container's CPU quota; OMP_NUM_THREADS when set)")
    m.add_argument("--enforce-eager", action="store_true", default=None,
                   help="CUDA: run decode steps eagerly, without capturing CUDA graphs")
    m.add_argument("--lora-modules", type=lora_module, nargs="+", action="extend", default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters served beside the model, each a PEFT adapter folder (adapter_config.json "
                        "and adapter_model.safetensors) under a name a request gives as its model; as vLLM, NAME=PATH "
                        "or JSON '{\"name\": ..., \"path\": ...}'; repeatable")
    m.add_argument("--enable-lora", action="store_true", default=None,
                   help="projections ready for LoRA adapters (implied by --lora-modules); with "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true in the environment, adapters are loaded and unloaded "
                        "while serving (POST /v1/load_lora_adapter, /v1/unload_lora_adapter)")
    m.add_argument("--max-lora-rank", type=at_least(1), default=None,
                   help="refuse an adapter of a higher rank, at start or loaded later (default: any rank)")
    s = p.add_argument_group("scheduler and KV cache")
    s.add_argument("--max-batch", "--max-num-seqs", dest="max_num_seqs", type=int, default=None,
                   help=f"maximum sequences in a decode batch {shown(preset.max_num_seqs)}")
    s.add_argument("--max-model-len", type=int, default=None,
                   help=f"context window per sequence, in tokens {shown(preset.max_model_len)}")
    s.add_argument("--block-size", type=int, default=None, help=f"tokens per KV cache block {shown(preset.block_size)}")
    s.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default: CPU: max-num-seqs x max-model-len tokens; CUDA: what "
                        "--gpu-memory-utilization leaves beside the weights and workspace)")
    s.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                   help="KV cache element type: auto = on CPU float16 for quantized weights (half the "
                        "memory and attention reads of float32, as llama.cpp) and float32 for dense ones; "
                        "int8 = int8 values with a scale per 32 (as llama.cpp's q8_0 cache: 0.56x float16's "
                        "memory, faster decode at long contexts); "
                        f"on CUDA the activations' dtype (bfloat16 by default), the only choice there "
                        f"{shown(preset.kv_cache_dtype)}")
    s.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="CUDA: share of the GPU's memory for weights, workspace and KV cache "
                        f"{shown(preset.gpu_memory_utilization)}")
    s.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="KV cache size in tokens (overrides --kv-cache-memory)")
    s.add_argument("--max-prefill-tokens", type=int, default=None,
                   help=f"prefill chunk per engine step {shown(preset.max_prefill_tokens)}")
    s.add_argument("--speculative-tokens", type=int, default=None, metavar="K",
                   help="speculative decoding: up to K draft tokens a step for each answer, looked up in its own "
                        "earlier tokens (n-gram), checked in one step; the text stays the same, repetitive "
                        "answers come faster. CPU, dense answers, at most 8 rows a step (default: 0, off)")
    s.add_argument("--pooling", choices=["mean", "last"], default=None,
                   help="/v1/embeddings: an input's vector is the mean of the model's final hidden states over "
                        "its tokens, or the state at its last token (for models trained as embedders that way) "
                        "(default: mean)")
    s.add_argument("--scheduling-policy", choices=list(SCHEDULING_POLICIES), default=None,
                   help="fcfs: requests in arrival order; priority: in order of their `priority` (lower first), "
                        f"then arrival, preempting the last in that order first {shown(preset.scheduling_policy)}")
    s.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="always prefill whole prompts (default: a prompt reuses cached KV blocks of its prefix)")
    s.add_argument("--max-waiting", type=at_least(0), default=None, help="sequences queued beyond the batch before "
                   f"429 (each choice of `n` and each embeddings input counts; default: {DEFAULT_MAX_WAITING})")
    k = p.add_argument_group("FFN skipping")
    k.add_argument("--skip-policy", choices=["ffn_skipllm", "batch_aligned", "none"], default=None,
                   help="ffn_skipllm: each row decides per layer; batch_aligned: the budgeted rows of a step "
                        f"skip the same layers once half of them fire; none: dense {shown(preset.skip.policy)}")
    k.add_argument("--skip-threshold", type=float, default=None,
                   help=f"cosine trigger threshold {shown(preset.skip.threshold)}")
    k.add_argument("--skip-cold-start", type=int, default=None,
                   help=f"first layers that always run their FFN {shown(preset.skip.cold_start)}")
    k.add_argument("--skip-cold-end", type=int, default=None,
                   help=f"last layers that always run their FFN {shown(preset.skip.cold_end)}")
    k.add_argument("--skip-warmup-tokens", type=int, default=None,
                   help=f"generated tokens that are always dense {shown(preset.skip.warmup_tokens)}")
    k.add_argument("--skip-interleave", type=int, default=None,
                   help=f"every N-th token after warm-up is dense; 0 = never {shown(preset.skip.interleave)}")
    k.add_argument("--skip-default-budget", type=float, default=None,
                   help=f"budget when a request sets none {shown(preset.skip.default_budget)}")
    k.add_argument("--skip-max-budget", type=float, default=None,
                   help=f"largest budget a request may ask {shown(preset.skip.max_budget)}")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", type=host, default=None,
                   help="address to listen on (default: $SKIPSERVE_HOST or 127.0.0.1)")
    h.add_argument("--port", type=port, default=None, help="port (default: $SKIPSERVE_PORT or 8000)")
    h.add_argument("--api-key", type=api_keys, nargs="+", action="extend", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize and the API docs; "
                        "several keys (given one after another or separated by commas): any of them "
                        f"(default: ${', $'.join(API_KEY_VARIABLES)}, the first set; a key is never printed or logged)")
    h.add_argument("--allowed-origins", type=allowed_origins,
                   default=os.environ.get("SKIPSERVE_ALLOWED_ORIGINS", ""),
                   help="web origins whose pages may call the API from a browser (CORS), comma-separated, or * "
                        "for any (default: $SKIPSERVE_ALLOWED_ORIGINS, else none)")
    h.add_argument("--max-request-bytes", type=at_least(1), default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"larger request bodies get 413 before they are parsed (default: {DEFAULT_MAX_REQUEST_BYTES})")
    h.add_argument("--header-timeout", type=at_least(0.0, float), default=10.0,
                   help="seconds a connection may take to send a request's headers; 0: no limit (default: 10)")
    h.add_argument("--body-timeout", type=at_least(0.0, float), default=10.0,
                   help="seconds a request's body may stop coming, between two reads, before it is answered 408; "
                        "0: no limit (default: 10)")
    h.add_argument("--keep-alive-timeout", type=at_least(0.0, float), default=5.0,
                   help="seconds an idle keep-alive connection stays open (default: 5)")
    h.add_argument("--grace-period", type=at_least(0.0, float), default=30.0,
                   help="seconds to finish in-flight requests after SIGTERM (default: 30)")
    h.add_argument("--log-level", "--uvicorn-log-level", default="info",
                   choices=["trace", "debug", "info", "warning", "error", "critical"],
                   help="(default: info; trace: uvicorn's, and this server's debug lines)")
    launcher_flags.add_groups(p)
    return p


def build_config(args) -> EngineConfig:
    from server.config_file import load_config, preset_path, served_name

    launcher_flags.resolve(args)  # vLLM's, TGI's and llama-server's flags as ours
    if args.config:
        config = load_config(args.config)
    elif preset_path(args.model or DEFAULT_PRESET):
        config = load_config(preset_path(args.model or DEFAULT_PRESET))
    else:
        config = EngineConfig(model=args.model, served_model_name=served_name(args.model))
    if args.model and args.config and preset_path(args.model):  # a preset named beside a file: its model
        config.model = load_config(preset_path(args.model)).model
    elif args.model and not preset_path(args.model):  # flags override a config file's model too
        config.model = args.model
    overrides = {k: getattr(args, k) for k in ("device", "dtype", "quantize", "cache_dir", "threads",
                                                 "chat_template", "max_num_seqs", "max_model_len", "block_size",
                                                 "kv_capacity_tokens", "kv_cache_memory", "kv_cache_dtype",
                                                 "gpu_memory_utilization",
                                                 "max_prefill_tokens", "prefix_caching", "enforce_eager",
                                                 "speculative_tokens", "pooling", "scheduling_policy",
                                                 "generation_config", "override_generation_config", "enable_lora")
                 if getattr(args, k) is not None}
    if args.lora_modules:
        names = [name for name, _ in args.lora_modules]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # (as loading a second adapter under a name is refused while serving)
            raise ValueError(f"--lora-modules: the adapter name {twice[0]!r} is given twice "
                             "(a name serves one adapter)")
        overrides["lora_modules"] = config.lora_modules | dict(args.lora_modules)
    if args.default_loras:
        overrides["default_loras"] = config.default_loras + args.default_loras
    if args.lora_init_without_apply:  # llama-server's: every --lora adapter at 0 until POST /lora-adapters
        overrides["default_loras"] = [[path, 0.0] for path, _ in overrides.get("default_loras", config.default_loras)]
    if args.max_lora_rank is not None:
        overrides["max_lora_rank"] = args.max_lora_rank
    if args.served_model_name:
        overrides["served_model_name"] = args.served_model_name[0]
    if args.override_generation_config is not None:  # over a config file's, key by key
        overrides["override_generation_config"] = (config.override_generation_config or {}) | \
            args.override_generation_config
    config = replace(config, **overrides)
    if not config.served_model_name:  # a config file that names none: its model's name, as a plain --model
        config.served_model_name = served_name(config.model)
    skip = {k.removeprefix("skip_"): v for k, v in vars(args).items() if k.startswith("skip_") and v is not None}
    config.skip = replace(config.skip, **skip)
    config.check()
    return config


def runtime_lora_updating() -> bool:
    """vLLM's switch for its run-time LoRA routes, read as vLLM reads it."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound sockets for every address `host` names, as asyncio's create_server binds them (uvicorn's
    own way), but taken before the server starts: uvicorn binds after its lifespan startup, which
    begins the model load, so a port in use was reported at once and the process then waited out
    the whole load (minutes for a 7B model) before it exited."""
    socks = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("skipserve.server").info("listening on http://%s:%d", shown, socks[0].getsockname()[1])
    return socks


def serve(argv: list[str]) -> None:
    import uvicorn
    import yaml

    from engine.async_engine import AsyncEngine
    from server import access_log
    from server.app import create_app
    from server.http_protocol import with_timeouts

    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.port is None:  # $SKIPSERVE_PORT's errors name it (argparse's would name --port, not given)
        try:
            args.port = port(listen_defaults()[1])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"$SKIPSERVE_PORT: {exc}")
    keys, variable = api_keys_given(args, parser)
    logging.basicConfig(level="DEBUG" if args.log_level == "trace" else args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access_log.install()
    try:
        config = build_config(args)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # a config file missing or wrong: a usage error, no traceback
        parser.error(str(exc))
    if args.host is None:  # (after build_config: TGI's --hostname may have set it)
        try:
            args.host = host(listen_defaults()[0])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"$SKIPSERVE_HOST: {exc}")
    if args.max_input_tokens is not None and args.max_input_tokens >= config.max_model_len:
        parser.error(f"--max-input-tokens {args.max_input_tokens} must be below the context, --max-total-tokens / "
                     f"--max-model-len {config.max_model_len} (an answer needs a token)")
    try:
        max_waiting = launcher_flags.max_waiting(args, config, DEFAULT_MAX_WAITING)
    except ValueError as exc:
        parser.error(str(exc))
    engine = AsyncEngine(config, max_waiting=max_waiting)
    server: uvicorn.Server | None = None

    def engine_failed(exc: BaseException) -> None:  # exit non-zero, as vLLM does, instead of serving 503s
        if server is not None:
            server.should_exit = True

    names = (config.served_model_name, *(args.served_model_name or [])[1:])
    if set(names) & set(config.lora_modules):
        parser.error(f"LoRA adapter {sorted(set(names) & set(config.lora_modules))[0]!r} has the model's own name; "
                     "an adapter needs another")
    if variable is not None:
        logging.getLogger("skipserve").info("API key%s from $%s", "s" if len(keys) > 1 else "", variable)
    app = create_app(engine, names, keys, args.max_request_bytes, engine_failed,
                     args.allowed_origins, args.reasoning_parser, args.tool_call_parser, args.max_input_tokens,
                     docs=not args.disable_fastapi_docs, runtime_lora=runtime_lora_updating())

    grace = args.grace_period  # (at least 0: a usage error otherwise)
    # sse-starlette would cut every stream the moment SIGTERM arrives; we drain them ourselves:
    # streams finish within the grace period or end with an error event (fail_in_flight below).
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()

    class Server(uvicorn.Server):
        forced = False  # a second Ctrl-C stopped it at once

        def handle_exit(self, sig, frame):
            if app.state.skipserve.draining and sig == signal.SIGINT and not self.forced:
                # a second Ctrl-C: quit now, as uvicorn does, but each request ends with an error event
                # (a 503) first, not a cut stream or a plain 500; its exit status is Ctrl-C's (130)
                self.forced = True
                engine.fail_in_flight("the server was stopped (a second Ctrl-C)")
                asyncio.get_event_loop().call_later(0.3, super().handle_exit, sig, frame)
                return
            if not app.state.skipserve.draining:
                app.state.skipserve.draining = True  # /health and new requests answer 503 from now on
                # Shortly before uvicorn would cut connections, end what still runs with an error event.
                loop = asyncio.get_event_loop()
                loop.call_later(max(0.0, grace - 0.5), engine.fail_in_flight,
                                f"the server is shutting down (grace period of {grace:g} s is over)")
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a graceful stop is a success: exit 0, don't re-raise it
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=grace,
                                   http=with_timeouts(args.header_timeout, args.body_timeout),
                                   timeout_keep_alive=args.keep_alive_timeout,
                                   access_log=not args.disable_uvicorn_access_log))
    try:
        sockets = listen_sockets(args.host, args.port)
    except OSError as exc:
        sys.exit(f"skipserve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn re-raises a Ctrl-C once it has shut down: a stop, not a crash
        pass
    if server.forced:
        sys.exit(130)
    if engine.load_error is not None:
        sys.exit(f"skipserve: the model failed to load: {type(engine.load_error).__name__}: {engine.load_error}")
    if engine.dead is not None:
        sys.exit(f"skipserve: the engine stopped: {type(engine.dead).__name__}: {engine.dead}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "calibrate":
        from engine.calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    serve(argv)


if __name__ == "__main__":
    main()
