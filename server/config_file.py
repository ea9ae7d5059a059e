"""Presets and YAML config files -> EngineConfig (CLI flags override both)."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from engine.config import EngineConfig, SkipConfig
from engine.tokenizer import is_inline_template

PRESETS = Path(__file__).resolve().parent / "presets"  # package data: installed with the server


def preset_path(name: str) -> Path | None:
    path = PRESETS / f"{name}.yaml"
    return path if path.exists() else None


def load_config(path: str | Path) -> EngineConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    skip_raw = raw.pop("skip", {}) or {}
    engine_keys = {f.name for f in fields(EngineConfig)}
    skip_keys = {f.name for f in fields(SkipConfig)}
    unknown = (set(raw) - engine_keys) | {f"skip.{k}" for k in set(skip_raw) - skip_keys}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    template = raw.get("chat_template")
    if isinstance(template, str) and not is_inline_template(template):
        # a template file named in a config file is found beside it, as the file's other paths would be
        raw["chat_template"] = str(Path(path).resolve().parent / Path(template).expanduser())
    return EngineConfig(**raw, skip=SkipConfig(**skip_raw))
