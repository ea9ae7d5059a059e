"""Presets and YAML config files -> EngineConfig (CLI flags override both)."""
from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import yaml

from engine.config import EngineConfig, SkipConfig
from engine.tokenizer import is_inline_template

PRESETS = Path(__file__).resolve().parent / "presets"  # package data: installed with the server


def preset_path(name: str) -> Path | None:
    """The preset of this name (a bare name: a path such as `/data/x` or `./gemma3-270m` is none)."""
    if not name or Path(name).name != name or name in (".", ".."):
        return None
    path = PRESETS / f"{name}.yaml"
    return path if path.exists() else None


def served_name(model: str) -> str:
    """The name a model is served under when nothing names it: a preset's own, else the file's or
    folder's name (the embedded default's for none)."""
    if not model:
        return EngineConfig.served_model_name
    preset = preset_path(model)
    if preset is not None:
        return load_config(preset).served_model_name
    return Path(model.rstrip("/")).name


def load_config(path: str | Path) -> EngineConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (UTF-8)") from None
    except yaml.YAMLError as exc:  # its place reads "<unicode string>": the file's name goes in front
        raise ValueError(f"{path}: not YAML: {exc}".replace('"<unicode string>", ', "")) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("skip") or {}, dict):
        raise ValueError(f"{path}: a config file is a mapping of settings (key: value), skip: one too")
    skip_raw = raw.pop("skip", {}) or {}
    engine_keys = {f.name for f in fields(EngineConfig)}
    skip_keys = {f.name for f in fields(SkipConfig)}
    unknown = (set(raw) - engine_keys) | {f"skip.{k}" for k in set(skip_raw) - skip_keys}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    for cls, values, prefix in ((EngineConfig, raw, ""), (SkipConfig, skip_raw, "skip.")):
        _check_types(cls, values, f"{path}: {prefix}")
    raw.setdefault("served_model_name", "")  # none in the file: named after its model (server/cli.py)
    folder = Path(path).resolve().parent

    def beside(name):  # a file named in a config file is found beside it
        return str(folder / Path(name).expanduser()) if isinstance(name, str) else name

    template = raw.get("chat_template")
    if isinstance(template, str) and not is_inline_template(template):
        raw["chat_template"] = beside(template)

    # the model and a generation config's folder: a relative path is found beside the file too (a bare
    # name only where the file's folder holds it: else an embedded model's, or `auto`, say); the cache too
    for key in ("model", "generation_config", "cache_dir"):
        name = raw.get(key)
        if isinstance(name, str) and name and (key == "cache_dir" or Path(name).name != name or (folder / name).exists()):
            raw[key] = beside(name)
    if isinstance(raw.get("lora_modules"), dict):
        raw["lora_modules"] = {name: beside(adapter) for name, adapter in raw["lora_modules"].items()}
    if isinstance(raw.get("default_loras"), list):
        raw["default_loras"] = [[beside(item[0]), *item[1:]] if isinstance(item, list) and item else item
                                for item in raw["default_loras"]]
    return EngineConfig(**raw, skip=SkipConfig(**skip_raw))


SIMPLE = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _check_types(cls, values: dict, where: str) -> None:
    """Each value of the file of the type its field takes (a list where a string goes failed later,
    far from the file), None where the field allows it."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if value is None and type(None) in allowed or any(_is(value, t) for t in allowed):
            continue
        kinds = [SIMPLE[t] for t in allowed if t in SIMPLE]
        if kinds:
            raise ValueError(f"{where}{key} must be {' or '.join(kinds)}, got {value!r}")


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True
