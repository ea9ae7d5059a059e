"""argparse types of the serve command's values (and of other servers' spellings of them,
server/launcher_flags.py): each refuses a value that would start a server no client could use."""
from __future__ import annotations

import argparse
import json
import re

ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")  # what a browser sends as Origin: scheme://host[:port]


def allowed_origins(value: str) -> tuple[str, ...]:
    """`--allowed-origins`: comma-separated origins, or `*` for any."""
    # as browsers send them: scheme and host in lower case, no trailing slash
    origins = tuple(o.strip().rstrip("/").lower() for o in value.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin (scheme://host[:port], e.g. "
                                             "http://localhost:3000) or *")
    return origins


def host(value: str) -> str:
    """`--host`: an address or name; empty would listen on every interface, which is `0.0.0.0`'s to say."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty (0.0.0.0 listens on every interface)")
    return value.strip()


def port(value: str) -> int:
    """`--port` (and $SKIPSERVE_PORT, its default): a TCP port number."""
    if not value.strip().isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (0 to 65535)")
    return int(value)


def api_keys(value: str) -> tuple[str, ...]:
    """`--api-key` (and $SKIPSERVE_API_KEY): one key, or several separated by commas (llama-server's
    list; any of them is taken), each what a client sends after `Bearer `, so visible ASCII with no
    spaces. Empty (`--api-key "$KEY"` of an unset KEY) served with no key at all; a space or newline
    around it, or a letter outside ASCII, made a key no client could send (a key itself is never
    printed)."""
    keys = tuple(value.split(","))
    if not all(keys):
        raise argparse.ArgumentTypeError("empty: leave it out to serve without a key (several keys: separated "
                                         "by commas, none empty)")
    if not all("!" <= c <= "~" for key in keys for c in key):
        raise argparse.ArgumentTypeError("a key is visible ASCII characters with no spaces or line ends (the key "
                                         "is not shown)")
    return keys


def at_least(low, kind=int):
    """An argparse type: a number of `kind` no smaller than `low` (a negative queue or timeout
    would refuse every request)."""
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not number >= low:
            raise argparse.ArgumentTypeError(f"{value!r}: at least {low}")
        return number
    return parse


def json_object(value: str) -> dict:
    """A JSON object given on the command line (vLLM's --override-generation-config)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"a JSON object ({{...}}), got {value!r}")
    return parsed


def lora_module(value: str) -> tuple[str, str]:
    """`--lora-modules` (vLLM's): NAME=PATH, or a JSON object with "name" and "path" (vLLM's
    "base_model_name" is taken: an adapter here is always of the served model)."""
    if value.lstrip().startswith("{"):
        try:
            item = json.loads(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
        name, path = item.get("name"), item.get("path")
        if not isinstance(name, str) or not isinstance(path, str) or set(item) - {"name", "path", "base_model_name"}:
            raise argparse.ArgumentTypeError('a JSON adapter is {"name": ..., "path": ...} (and "base_model_name")')
    else:
        name, _, path = value.partition("=")
    if not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: give NAME=PATH (an adapter's name in the API, its folder)")
    return name.strip(), path.strip()
