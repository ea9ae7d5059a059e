"""Other servers' command lines, read as they mean them: the flags a command written for `vllm
serve`, Hugging Face's `text-generation-launcher` or llama.cpp's `llama-server` passes, each taken
into this server's own settings (`add_groups` adds them to the parser; `resolve` turns the parsed
values into ours before the config is built). A flag whose meaning this server cannot keep is not
taken: argparse refuses it, or `resolve` says why."""
from __future__ import annotations

import argparse
import sys

from server.cli_types import at_least, host, json_object, lora_module

# llama-server's --reasoning-format values, as this server's --reasoning-parser (None: no parser)
REASONING_FORMATS = {"none": None, "deepseek": "qwen3", "deepseek-legacy": "qwen3", "auto": "qwen3"}
# llama.cpp's KV cache types this server keeps (-ctk / -ctv), as its --kv-cache-dtype names them
LLAMA_CPP_CACHE_TYPES = {"f32": "float32", "f16": "float16", "q8_0": "int8"}


class Parser(argparse.ArgumentParser):
    """argparse, as another server's flags need it read:
    - a flag is known by its whole name only: argparse would take a prefix of a long one
      (llama-server's `--keep 32` as `--keep-alive-timeout 32`), and read an unknown single-dash one
      that starts with a known letter as that letter and a value (`-tb 4` as `-t b`, `-md FILE` as
      `-m d`), naming the wrong flag, or none;
    - one setting given in two spellings with two values (`--max-model-len 512 --max-total-tokens
      1024`) is a usage error naming both, not the last one taken."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        for token in argv:
            flag = token.split("=", 1)[0]
            if token[:1] == "-" and token[1:2].isalpha() and len(flag) > 2 and flag not in self._option_string_actions:
                self.error(f"unrecognized argument: {flag}")
        for action in self._actions:
            if type(action) in SETTINGS and not isinstance(action, Spelled):
                action.__class__ = type(f"Spelled{type(action).__name__}", (Spelled, type(action)), {})
        parsed, extras = super().parse_known_args(argv, namespace)
        given = parsed.__dict__.pop(Spelled.GIVEN, {})
        for dest, spellings in given.items():
            said = {}  # each flag's value, the last of its own
            for action, flag, value in spellings:
                said[action] = (flag, value)
            if len({repr(value) for _, value in said.values()}) > 1:
                first, second = [flag if action.nargs == 0 else f"{flag} {value!r}"
                                 for action, (flag, value) in list(said.items())[:2]]
                self.error(f"one setting given twice with two values: {first} and {second}")
        return parsed, extras


# the actions that set one value (a list that each flag adds to, --lora-modules', is no conflict)
SETTINGS = (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


class Spelled(argparse.Action):
    """A setting's action that notes under which flag it set what (Parser's check of two spellings)."""
    GIVEN = "_spellings_given"

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        if option_string is not None:
            namespace.__dict__.setdefault(self.GIVEN, {}).setdefault(self.dest, []).append(
                (self, option_string, getattr(namespace, self.dest)))


def add_groups(p: argparse.ArgumentParser) -> None:
    add_vllm(p)
    add_tgi(p)
    add_llama_cpp(p)


def add_vllm(p: argparse.ArgumentParser) -> None:
    v = p.add_argument_group("vLLM's spellings", "what a command written for `vllm serve` passes, taken as this "
                             "server means it")
    v.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as `vllm serve MODEL` names it (the same as --model)")
    v.add_argument("--max-num-batched-tokens", dest="max_prefill_tokens", type=int, default=None,
                   help="the same as --max-prefill-tokens (vLLM's budget counts a step's decode rows too)")
    v.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true", default=None,
                   help="prefix caching, on by default here")
    v.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="the same as --no-prefix-caching")
    v.add_argument("--tensor-parallel-size", "-tp", type=int, choices=[1], default=None,
                   help="1 only: a model runs on one device here")
    v.add_argument("--enable-chunked-prefill", action="store_true", default=None,
                   help="taken: prompts are always prefilled in chunks here")
    v.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                   help="taken: tool_choice auto is always served here")
    v.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="taken: no model code is ever run here (GGUF files and configs only)")
    v.add_argument("--disable-uvicorn-access-log", action="store_true", default=False,
                   help="no line per HTTP request in the log")
    v.add_argument("--disable-fastapi-docs", action="store_true", default=False,
                   help="no /docs, /redoc or /openapi.json")
    for flags, what in ((("--disable-log-requests", "--no-enable-log-requests"),
                         "requests' prompts and settings are never logged here"),
                        (("--disable-log-stats",), "no periodic stats lines are logged here (/metrics has them)")):
        v.add_argument(*flags, action="store_true", default=None, help=f"taken: {what}")
    v.add_argument("--download-dir", default=None, metavar="DIR", help="taken: nothing is downloaded here")
    v.add_argument("--swap-space", type=float, default=None, metavar="GIB",
                   help="taken: a preempted sequence is recomputed here, not swapped out")
    v.add_argument("--max-loras", "--max-cpu-loras", type=at_least(1), default=None, metavar="N",
                   help="taken: every adapter of --lora-modules stays loaded, and a batch mixes any of them")
    v.add_argument("--speculative-config", type=ngram_speculation, default=None, metavar="JSON",
                   help='n-gram speculation, {"method": "ngram", "num_speculative_tokens": K}: the same as '
                        "--speculative-tokens K (prompt_lookup_max / _min taken: the drafter looks up 2- to "
                        "4-grams); draft models (eagle, medusa, a model) are not served")


def add_tgi(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("TGI's spellings", "what a command written for text-generation-launcher passes, taken "
                             "as this server means it")
    t.add_argument("--model-id", default=None, help="the same as --model")
    t.add_argument("--hostname", type=host, default=None, help="the same as --host")
    t.add_argument("--max-total-tokens", dest="max_model_len", type=int, default=None,
                   help="the same as --max-model-len (a prompt and its answer together)")
    t.add_argument("--max-input-tokens", "--max-input-length", dest="max_input_tokens", type=at_least(1), default=None,
                   help="the longest prompt a generating request may have, in tokens (below --max-total-tokens; "
                        "default: the context's)")
    t.add_argument("--max-batch-size", dest="max_num_seqs", type=int, default=None, help="the same as --max-batch")
    t.add_argument("--max-batch-prefill-tokens", dest="max_prefill_tokens", type=int, default=None,
                   help="the same as --max-prefill-tokens")
    t.add_argument("--max-concurrent-requests", type=at_least(1), default=None, metavar="N",
                   help="at most N sequences in the server, running and queued, before 429 (each choice of `n` and "
                        "each embeddings input counts): a batch of at most N, and --max-waiting the rest")
    t.add_argument("--payload-limit", dest="max_request_bytes", type=at_least(1), default=None,
                   help="the same as --max-request-bytes")
    t.add_argument("--lora-adapters", dest="lora_modules", type=lora_adapters, action="extend", default=None,
                   metavar="NAME=PATH,...", help="the same as --lora-modules, comma-separated (a request's "
                                                 "parameters.adapter_id, or its model, names one)")
    t.add_argument("--num-shard", type=int, choices=[1], default=None, help="1 only: a model runs on one device here")
    t.add_argument("--cuda-graphs", type=cuda_graphs, default=None, metavar="SIZES",
                   help="0: the same as --enforce-eager; other batch sizes are taken, the captured sizes are this "
                        "server's (1, 2, 4, 8, then steps of 16)")


def lora_adapters(value: str) -> list[tuple[str, str]]:
    """TGI's `--lora-adapters`: NAME=PATH items, comma-separated (a hub id alone would be downloaded
    there: here an adapter is a folder on disk)."""
    return [lora_module(item) for item in value.split(",") if item.strip()]


def lora_files(value: str) -> list[list]:
    """llama-server's `--lora FNAME[,FNAME...]`: each [FNAME, 1.0]."""
    return [[path, 1.0] for path in value.split(",") if path]


class ScaledLora(argparse.Action):
    """llama-server's `--lora-scaled`: `FNAME:SCALE[,FNAME:SCALE...]`, or its older `FNAME SCALE`;
    each [FNAME, SCALE] beside --lora's [FNAME, 1.0]."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 2 and ":" not in values[1]:  # the older form, two words
            pairs = [values]
        elif len(values) == 1:
            pairs = [item.rpartition(":")[::2] for item in values[0].split(",") if item]
        else:
            raise argparse.ArgumentError(self, "give FNAME:SCALE[,FNAME:SCALE...] (or FNAME SCALE)")
        taken = []
        for path, scale in pairs:
            try:
                number = float(scale)
            except ValueError:
                raise argparse.ArgumentError(self, f"{path!r}: {scale!r} is not a scale (FNAME:SCALE)") from None
            if not path or number != number or abs(number) == float("inf"):
                raise argparse.ArgumentError(self, f"{path!r}: {scale!r} is not a finite scale (FNAME:SCALE)")
            taken.append([path, number])
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + taken)


def add_llama_cpp(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("llama.cpp's spellings", "what a command written for llama-server passes, taken as "
                             "this server means it")
    c.add_argument("-m", dest="model_m", default=None, help="the same as --model")
    c.add_argument("-a", "--alias", type=aliases, default=None, metavar="NAMES",
                   help="the model's names in the API, comma-separated (the same as --served-model-name)")
    c.add_argument("-t", dest="threads", type=threads, default=None,
                   help="the same as --threads (0 or below: the CPUs this process may use)")
    c.add_argument("-np", "--parallel", type=slots, default=None, metavar="N",
                   help="the same as --max-batch; -1 (auto): the preset's")
    c.add_argument("-c", "--ctx-size", type=at_least(0), default=None, metavar="N",
                   help="the KV cache holds N tokens (--kv-capacity-tokens), and each sequence at most N / "
                        "--parallel where --parallel is given without --kv-unified, as llama-server's slots split "
                        "it, else N (--max-model-len); 0: as if not given (the preset's context)")
    c.add_argument("-kvu", "--kv-unified", dest="kv_unified", action="store_true", default=None,
                   help="every sequence may take the whole --ctx-size (the KV cache is one pool here either way)")
    c.add_argument("-no-kvu", "--no-kv-unified", dest="kv_unified", action="store_false", default=None,
                   help="each sequence at most --ctx-size / --parallel (llama-server's default with --parallel)")
    c.add_argument("-b", "--batch-size", dest="max_prefill_tokens", type=int, default=None,
                   help="the same as --max-prefill-tokens")
    c.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="gpu_layers", type=gpu_layers, default=None,
                   metavar="N", help="0: the CPU (--device cpu); any other count, all, auto or -1: --device auto "
                                     "(the GPU where there is one, every layer: a model runs on one device here)")
    c.add_argument("--lora", dest="default_loras", type=lora_files, action="extend", default=None,
                   metavar="FNAME[,FNAME...]", help="LoRA adapters (llama.cpp's GGUF, or PEFT folders) applied "
                                                    "together to every request that names the model itself; "
                                                    "repeatable (each as --lora-scaled FNAME:1)")
    c.add_argument("--lora-scaled", dest="default_loras", nargs="+", action=ScaledLora, default=None,
                   metavar="FNAME:SCALE", help="the same as --lora, each adapter's product times its SCALE "
                                               "(FNAME:SCALE[,...], or the older FNAME SCALE)")
    c.add_argument("--lora-init-without-apply", action="store_true",
                   help="the --lora adapters read at scale 0 (the model alone) until POST /lora-adapters scales them")
    c.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", choices=list(LLAMA_CPP_CACHE_TYPES), default=None,
                   help="K's cache type: f32, f16 or q8_0 (--kv-cache-dtype float32, float16, int8); one type for K "
                        "and V here, so -ctv must be the same (llama-server's default for either: f16)")
    c.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", choices=list(LLAMA_CPP_CACHE_TYPES), default=None,
                   help="V's cache type, the same as -ctk's")
    c.add_argument("--cache-prompt", dest="prefix_caching", action="store_true", default=None,
                   help="prefix caching, on by default here")
    c.add_argument("--no-cache-prompt", dest="prefix_caching", action="store_false", default=None,
                   help="the same as --no-prefix-caching")
    c.add_argument("--chat-template-file", dest="chat_template", default=None, metavar="FILE",
                   help="the same as --chat-template FILE (llama-server's built-in template names are not taken: "
                        "give the template itself)")
    for flags, key in ((("--temp",), "temperature"), (("--top-k",), "top_k"), (("--top-p",), "top_p"),
                       (("--min-p",), "min_p"), (("--repeat-penalty",), "repetition_penalty")):
        c.add_argument(*flags, dest=f"llama_{key}", type=int if key == "top_k" else float, default=None,
                       metavar="N", help=f"requests' default {key} (--override-generation-config's {key})")
    c.add_argument("--reasoning-format", choices=list(REASONING_FORMATS), default=None,
                   help="deepseek (or deepseek-legacy, auto): a chat answer's <think>...</think> as "
                        "message.reasoning_content, the same as --reasoning-parser qwen3 (an answer that opens "
                        "<think>, or a prompt that leaves it open); none: the thinking stays in the content")
    c.add_argument("-fa", "--flash-attn", nargs="?", const="on", choices=["on", "off", "auto"], default=None,
                   help="taken: decode attention here is always the fused paged kernel")
    for flags, what in ((("--jinja",), "chat templates are always rendered with Jinja here"),
                        (("-cb", "--cont-batching"), "batching is always continuous here"),
                        (("--metrics",), "/metrics is always served"),
                        (("--embedding", "--embeddings"), "/v1/embeddings is always served, beside generation"),
                        (("--rerank", "--reranking"), "/v1/rerank is always served"),
                        (("--no-webui",), "no web page is served")):
        c.add_argument(*flags, action="store_true", default=None, help=f"taken: {what}")


# vLLM's --speculative-config keys an n-gram config may hold (the lookup's bounds are the drafter's own)
NGRAM_KEYS = frozenset({"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"})


def ngram_speculation(value: str) -> int:
    """vLLM's --speculative-config, for its n-gram method ("[ngram]" as its older `model`): the draft
    tokens a step. Any other method needs a draft model, which this server does not run."""
    config = json_object(value)
    method, model = config.get("method", config.get("model")), config.get("model", "[ngram]")
    if method not in ("ngram", "[ngram]") or model != "[ngram]":
        raise argparse.ArgumentTypeError(f"only n-gram speculation is served here (method 'ngram'), got method "
                                         f"{method!r} and model {model!r}: draft models are not run")
    unknown = sorted(config.keys() - NGRAM_KEYS)
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r} is not taken here (an n-gram config takes "
                                         f"{', '.join(sorted(NGRAM_KEYS))})")
    tokens = config.get("num_speculative_tokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise argparse.ArgumentTypeError(f"num_speculative_tokens must be a positive integer, got {tokens!r}")
    return tokens


def cuda_graphs(value: str) -> bool:
    """TGI's --cuda-graphs: "0" turns graphs off (True: eager); a list of sizes is taken."""
    sizes = [part.strip() for part in value.split(",")]
    if not all(part.isdigit() for part in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes separated by commas, or 0, got {value!r}")
    return sizes == ["0"]


def aliases(value: str) -> list[str]:
    """llama-server's --alias: one name, or several separated by commas."""
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"names separated by commas, none empty, got {value!r}")
    return names


def slots(value: str) -> int | None:
    """llama-server's --parallel: a number of slots, or -1 for its automatic choice (None: ours)."""
    number = at_least(-1)(value)
    if number == 0:
        raise argparse.ArgumentTypeError("0 slots would serve nothing: at least 1, or -1 (auto)")
    return None if number == -1 else number


def gpu_layers(value: str) -> str:
    """llama-server's --n-gpu-layers as a device: 0 the CPU; any other count, all or auto (-1): the
    GPU where there is one, else the CPU (as llama-server runs without a GPU backend), every layer."""
    if value in ("auto", "all") or value.lstrip("-").isdigit() and int(value) == -1:
        return "auto"
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"a number of layers, -1, auto or all, got {value!r}")
    return "cpu" if int(value) == 0 else "auto"


def threads(value: str) -> int | None:
    """llama-server's -t: a number of threads; 0 or below, all of them (None: this server's count)."""
    number = at_least(-(1 << 31))(value)
    return number if number > 0 else None


def resolve(args: argparse.Namespace) -> None:
    """The other servers' values as this server's own settings, in place: raises ValueError where two
    flags say different things."""
    # the same setting under another server's spelling: taken where ours is not given, refused where it says otherwise
    given_as = {"model": "--model", "host": "--host"}  # the spelling each value came from, for the error
    for ours, theirs, spelling in (("model", "model_tag", "MODEL"), ("model", "model_id", "--model-id"),
                                   ("model", "model_m", "-m"), ("host", "hostname", "--hostname")):
        value = getattr(args, theirs, None)
        if value is None:
            continue
        if getattr(args, ours) is not None and getattr(args, ours) != value:
            what = "the model" if ours == "model" else "the host"
            raise ValueError(f"{what} is given twice: {given_as[ours]} {getattr(args, ours)!r} and {spelling} {value!r}")
        setattr(args, ours, value)
        given_as[ours] = spelling
    if getattr(args, "cuda_graphs", None):  # TGI's --cuda-graphs 0
        args.enforce_eager = True
    drafts = getattr(args, "speculative_config", None)
    if drafts is not None:  # vLLM's --speculative-config
        if args.speculative_tokens is not None and args.speculative_tokens != drafts:
            raise ValueError(f"the draft tokens are given twice: --speculative-tokens {args.speculative_tokens} and "
                             f"--speculative-config's num_speculative_tokens {drafts}")
        args.speculative_tokens = drafts
    if getattr(args, "alias", None):
        if args.served_model_name:
            raise ValueError("the model's names are given twice: --alias and --served-model-name")
        args.served_model_name = args.alias
    layers = getattr(args, "gpu_layers", None)
    if layers is not None:  # (cpu for 0, auto for any other count)
        if args.device is not None and (layers == "cpu") != (args.device == "cpu"):
            raise ValueError(f"--n-gpu-layers {'0 runs on the CPU' if layers == 'cpu' else 'puts layers on a GPU'}, "
                             f"--device {args.device} says otherwise")
        args.device = args.device or layers
    resolve_llama_cpp_cache(args)
    form = getattr(args, "reasoning_format", None)
    if form is not None:  # llama-server's --reasoning-format
        if args.reasoning_parser is not None and args.reasoning_parser != REASONING_FORMATS[form]:
            raise ValueError(f"--reasoning-format {form} and --reasoning-parser {args.reasoning_parser} say otherwise")
        args.reasoning_parser = REASONING_FORMATS[form]
    sampling = {k.removeprefix("llama_"): v for k, v in vars(args).items() if k.startswith("llama_") and v is not None}
    if sampling:  # llama-server's sampling flags: the server's defaults for requests
        given = getattr(args, "override_generation_config", None) or {}
        for key in sampling.keys() & given.keys():
            if given[key] != sampling[key]:
                raise ValueError(f"{key} is given twice: {sampling[key]} and --override-generation-config's "
                                 f"{given[key]}")
        args.override_generation_config = given | sampling


def resolve_llama_cpp_cache(args: argparse.Namespace) -> None:
    """llama-server's --parallel, --ctx-size and cache types as the batch, the KV cache and the context."""
    if getattr(args, "parallel", None) is not None:
        if args.max_num_seqs is not None and args.max_num_seqs != args.parallel:
            raise ValueError(f"the batch is given twice: --parallel {args.parallel} and --max-batch "
                             f"{args.max_num_seqs}")
        args.max_num_seqs = args.parallel
    if getattr(args, "ctx_size", None):  # (0: the model's, as llama-server reads it)
        if args.kv_capacity_tokens is None:
            args.kv_capacity_tokens = args.ctx_size
        split = args.parallel is not None and not args.kv_unified  # llama-server's slots each take a share
        per_sequence = args.ctx_size // args.parallel if split else args.ctx_size
        if per_sequence < 1:
            raise ValueError(f"--ctx-size {args.ctx_size} over {args.parallel} slots leaves none to a slot")
        if args.max_model_len is None:
            args.max_model_len = per_sequence
    k, v = getattr(args, "cache_type_k", None), getattr(args, "cache_type_v", None)
    if k is not None or v is not None:
        k, v = k or "f16", v or "f16"  # llama-server's default for the one not given
        if k != v:
            raise ValueError(f"one cache type for K and V here: -ctk {k} and -ctv {v} differ (llama-server's "
                             "default for either is f16)")
        if args.kv_cache_dtype is not None and args.kv_cache_dtype != LLAMA_CPP_CACHE_TYPES[k]:
            raise ValueError(f"-ctk/-ctv {k} and --kv-cache-dtype {args.kv_cache_dtype} differ")
        if args.device is not None and args.device.startswith("cuda"):  # the cache holds the activations' dtype
            if k != "f16":
                raise ValueError(f"-ctk/-ctv {k}: a CPU cache type; on CUDA the cache holds the activations' "
                                 "16-bit dtype (-ctk f16, or leave them out)")
            return
        args.kv_cache_dtype = LLAMA_CPP_CACHE_TYPES[k]


def max_waiting(args: argparse.Namespace, config, default: int) -> int:
    """The queue beyond the batch (--max-waiting, else `default`); TGI's --max-concurrent-requests N
    instead caps the batch at N (`config`'s, in place) and queues the rest of N."""
    limit = getattr(args, "max_concurrent_requests", None)
    if limit is None:
        return default if args.max_waiting is None else args.max_waiting
    if args.max_waiting is not None:
        raise ValueError("--max-concurrent-requests sets the queue: leave --max-waiting out")
    config.max_num_seqs = min(config.max_num_seqs, limit)
    return limit - config.max_num_seqs
