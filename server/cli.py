"""`skipserve` command line: serve (default) and calibrate."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace

from engine.config import EngineConfig

DEFAULT_PRESET = "smollm2-135m-instruct"


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skipserve",
        description="Serve a model with an OpenAI-compatible API and adaptive FFN skipping. "
                    "`skipserve calibrate --help` for the calibration tool.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="preset name (server/presets/NAME.yaml), path to a .gguf file, or a local HF folder; "
                        f"default: the embedded {DEFAULT_PRESET}")
    m.add_argument("--config", default=None, help="YAML config file (as server/presets/*.yaml); flags override it")
    m.add_argument("--served-model-name", default=None, help="model name in the API (default: the preset's)")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    m.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="auto = float32 on CPU, bfloat16 on CUDA")
    m.add_argument("--cache-dir", default=None, help="where converted GGUF weights are cached "
                   "(default: $SKIPSERVE_CACHE or ~/.cache/skipserve)")
    m.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    s = p.add_argument_group("scheduler and KV cache")
    s.add_argument("--max-batch", "--max-num-seqs", dest="max_num_seqs", type=int, default=None,
                   help="maximum sequences in a decode batch")
    s.add_argument("--max-model-len", type=int, default=None, help="context window per sequence, in tokens")
    s.add_argument("--block-size", type=int, default=None, help="tokens per KV cache block")
    s.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default: CPU: max-num-seqs x max-model-len tokens; CUDA: what "
                        "--gpu-memory-utilization leaves beside the weights and workspace)")
    s.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="CUDA: share of the GPU's memory for weights, workspace and KV cache (default 0.9)")
    s.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="KV cache size in tokens (overrides --kv-cache-memory)")
    s.add_argument("--max-prefill-tokens", type=int, default=None, help="prefill chunk per engine step")
    s.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="always prefill whole prompts (by default a prompt reuses cached KV blocks of its prefix)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond the batch before 429")
    k = p.add_argument_group("FFN skipping (defaults from the preset)")
    k.add_argument("--skip-policy", choices=["ffn_skipllm", "none"], default=None)
    k.add_argument("--skip-threshold", type=float, default=None, help="cosine trigger threshold")
    k.add_argument("--skip-cold-start", type=int, default=None, help="first layers that always run their FFN")
    k.add_argument("--skip-cold-end", type=int, default=None, help="last layers that always run their FFN")
    k.add_argument("--skip-warmup-tokens", type=int, default=None, help="generated tokens that are always dense")
    k.add_argument("--skip-interleave", type=int, default=None, help="every N-th token after warm-up is dense")
    k.add_argument("--skip-default-budget", type=float, default=None, help="budget when a request sets none")
    k.add_argument("--skip-max-budget", type=float, default=None, help="largest budget a request may ask")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--api-key", default=os.environ.get("SKIPSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (env SKIPSERVE_API_KEY)")
    h.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds to finish in-flight requests after SIGTERM")
    h.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def build_config(args) -> EngineConfig:
    from server.config_file import load_config, preset_path

    if args.config:
        config = load_config(args.config)
    elif preset_path(args.model or DEFAULT_PRESET):
        config = load_config(preset_path(args.model or DEFAULT_PRESET))
    else:
        config = EngineConfig(model=args.model, served_model_name=os.path.basename(args.model.rstrip("/")))
    if args.model and not preset_path(args.model):
        config.model = args.model
    overrides = {k: getattr(args, k) for k in ("served_model_name", "device", "dtype", "cache_dir", "threads",
                                                 "max_num_seqs", "max_model_len", "block_size",
                                                 "kv_capacity_tokens", "kv_cache_memory", "gpu_memory_utilization",
                                                 "max_prefill_tokens", "prefix_caching") if getattr(args, k) is not None}
    config = replace(config, **overrides)
    skip = {k.removeprefix("skip_"): v for k, v in vars(args).items() if k.startswith("skip_") and v is not None}
    config.skip = replace(config.skip, **skip)
    return config


def serve(argv: list[str]) -> None:
    import uvicorn

    from engine.async_engine import AsyncEngine
    from server.app import create_app

    args = serve_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(args)
    engine = AsyncEngine(config, max_waiting=args.max_waiting)
    app = create_app(engine, config.served_model_name, args.api_key)

    grace = max(0.0, args.grace_period)
    # sse-starlette would cut every stream the moment SIGTERM arrives; we drain them ourselves:
    # streams finish within the grace period or end with an error event (fail_in_flight below).
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
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
                                   timeout_graceful_shutdown=grace))
    server.run()


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
