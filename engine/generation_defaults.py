"""The sampling a model's makers recommend, as the defaults of requests that leave it out: vLLM's
`--generation-config` (auto: the model folder's `generation_config.json`; vllm: none, OpenAI's
defaults; or a folder holding one) and `--override-generation-config` (values of the server's own,
over the file's). A GGUF's folder (engine/loader.py) carries what the file's `general.sampling.*`
keys say, as llama.cpp takes them for its defaults.

The keys taken are vLLM's: temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens;
the result is in requests' names. As in vLLM, max_new_tokens is a cap ("max_tokens" here): an
answer is at most that long, whatever the request asks, and the room its prompt leaves in the
context, its own max_tokens or completions' 16 may make it shorter; it never refuses a request."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from engine.sampling_params import InvalidParamError, SamplingParams

# generation config key -> the request field it is the default of
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
SETTINGS = ("auto", "vllm")  # besides a folder
log = logging.getLogger("skipserve.engine")
# a GGUF's sampling keys (llama.cpp's) -> the generation config's
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}


def sampling_defaults(hf_dir: Path, setting: str = "auto", override: dict | None = None) -> dict:
    """Request field -> default value: the generation config `setting` names, then `override` over it
    (its keys that are no sampling default here, and its nulls, are left out with a warning, as vLLM
    reads only these). A value of the model's own that no request could take is left out with a
    warning (the model still serves); one the server is given (a folder's, the override's) raises
    ValueError, named."""
    if setting == "vllm":
        given, source = {}, None
    else:
        folder = hf_dir if setting == "auto" else Path(setting).expanduser()
        if setting != "auto" and not (folder / "generation_config.json").is_file():
            raise ValueError(f"--generation-config {setting!r}: auto, vllm, or a folder holding "
                             "generation_config.json")
        given, source = _read(folder / "generation_config.json"), folder / "generation_config.json"
    taken = {}
    for key, value in given.items():
        if key not in KEYS or value is None:
            continue
        try:
            taken[key] = _checked(key, value)
        except ValueError as exc:
            if setting != "auto":
                raise
            log.warning("%s: %s; requests that leave it out take their own default", source, exc)
    taken |= check_override(override)
    return {KEYS[k]: v for k, v in taken.items()}


def check_override(override: dict | None) -> dict:
    """--override-generation-config's sampling keys, checked (at start, before the model loads)."""
    if override is not None and not isinstance(override, dict):
        raise ValueError(f"override_generation_config: a mapping of keys to values, got {override!r}")
    ignored = sorted(str(k) for k, v in (override or {}).items() if k not in KEYS or v is None)
    if ignored:
        log.warning("override_generation_config: %s left out: the defaults taken are %s (not null)",
                    ", ".join(ignored), ", ".join(KEYS))
    return {k: _checked(k, v) for k, v in (override or {}).items() if k in KEYS and v is not None}


def gguf_sampling(fields: dict) -> dict:
    """A GGUF's sampling keys as generation config keys (engine/loader.py writes them into its
    folder); float32 values as the decimals they were written from (0.6, not 0.6000000238)."""
    def decimal(value):
        return value if isinstance(value, int) else float(f"{value:.7g}")
    return {name: decimal(fields[key]) for key, name in GGUF_KEYS.items()
            if isinstance(fields.get(key), (int, float)) and not isinstance(fields.get(key), bool)}


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        given = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON generation config ({exc})") from None
    if not isinstance(given, dict):
        raise ValueError(f"{path}: not a JSON object")
    return given


def _checked(key: str, value):
    """A default its request field would take (engine/sampling_params.py's ranges): one outside
    them would be every request's 400. Integers where the request takes one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"generation config {key}: a number, got {value!r}")
    if key in ("top_k", "max_new_tokens"):
        if value != int(value):
            raise ValueError(f"generation config {key}: a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    try:
        SamplingParams(**{KEYS[key]: value}).validate(vocab_size=1)
    except InvalidParamError as exc:
        raise ValueError(f"generation config {key}: {exc}") from None
    return value
