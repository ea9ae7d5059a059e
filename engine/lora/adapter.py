"""A LoRA adapter as PEFT saves it: a folder with `adapter_config.json` and `adapter_model.safetensors`
(or `adapter_model.bin`), read into per-projection (A, B) pairs on this engine's module names.

A projection's output gains `scale * B (A x)`, with `scale = lora_alpha / r` (`/ sqrt(r)` under
rsLoRA). Only the decoder layers' seven projections are taken (q, k, v, o, gate, up, down, or
Phi-3's fused qkv and gate_up); anything else an adapter changes (embeddings, lm_head, DoRA's
magnitudes, `modules_to_save`) is refused by name rather than served half applied.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.gguf_file import is_gguf
from engine.lora.errors import AdapterError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
# peft's key: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (older saves: .lora_A.default.weight)
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where a config leaves it out
KEY = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.(\d+)\.((?:self_attn|mlp)\.(\w+)))"
                 r"\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    # "model.layers.{i}.{module}" (a checkpoint's module name) -> (A [r, in], B [out, r] with the scale in it)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def combined(name: str, parts: list[tuple[LoRAAdapter, float]]) -> LoRAAdapter:
    """Adapters applied together, each at its scale, as one: per module their A matrices stacked and
    their scaled B matrices side by side (the sum of their products, of the sum of their ranks)."""
    modules = dict.fromkeys(m for adapter, _ in parts for m in adapter.weights)
    weights = {m: (torch.cat([a.weights[m][0] for a, _ in parts if m in a.weights]),
                   torch.cat([a.weights[m][1] * s for a, s in parts if m in a.weights], dim=1)) for m in modules}
    return LoRAAdapter(name, ", ".join(a.path for a, _ in parts), max(a.shape[0] for a, _ in weights.values()), weights)


def read_adapter(name: str, path: str, max_rank: int | None = None, cfg=None) -> LoRAAdapter:
    """The PEFT adapter in folder `path` (or llama.cpp's GGUF adapter file there, read against the
    model's config `cfg`: engine/lora/gguf_adapter.py), in fp32 on the CPU; AdapterError for one this
    engine would not apply whole."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise AdapterError(f"LoRA adapter {name!r}: {folder} does not exist (a PEFT adapter folder, or llama.cpp's "
                           "GGUF adapter file)")
    if folder.is_file() and is_gguf(folder):  # llama.cpp's form of an adapter
        from engine.lora.gguf_adapter import read_gguf_adapter

        if cfg is None:
            raise AdapterError(f"LoRA adapter {name!r}: a GGUF adapter is read against the model's shapes")
        return read_gguf_adapter(name, folder, cfg, max_rank)
    if folder.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {folder} is a file, neither a PEFT adapter folder (give the "
                           "folder that holds adapter_config.json) nor llama.cpp's GGUF adapter")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {folder} holds no adapter_config.json (a PEFT adapter folder)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"LoRA adapter {name!r}: {config_file} is not JSON: {exc}") from None
    _check_config(name, config)
    rank, alpha = config["r"], config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"LoRA adapter {name!r}: r must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"LoRA adapter {name!r}: lora_alpha must be a number, got {alpha!r}")
    check_rank(name, rank, max_rank)
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _tensors(name, folder).items():
        match = KEY.match(key)
        if match is None:
            raise AdapterError(f"LoRA adapter {name!r} changes {key}: only the decoder layers' projections "
                               f"({', '.join(PROJECTIONS)}) are served")
        module, projection, side = match.group(1), match.group(4), match.group(5)
        if projection not in PROJECTIONS:
            raise AdapterError(f"LoRA adapter {name!r} changes {module}: only {', '.join(PROJECTIONS)} are served")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise AdapterError(f"LoRA adapter {name!r}: {key} is not a floating-point tensor")
        pairs.setdefault(module, {})[side] = tensor.float()
    weights = {}
    for module, pair in pairs.items():
        a, b = checked_pair(name, module, pair, ("A", "B"))
        weights[module] = (a.contiguous(), (b * scale).contiguous())
    return adapter_of(name, folder, weights)


def check_rank(name: str, rank: int, max_rank: int | None) -> None:
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"LoRA adapter {name!r} has rank {rank}, more than --max-lora-rank {max_rank}")


def checked_pair(name: str, module: str, pair: dict, sides: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's (A, B) from its tensors by side (PEFT's A and B, llama.cpp's a and b); AdapterError
    for half a pair, or shapes no rank-r pair has."""
    if set(pair) != set(sides):
        raise AdapterError(f"LoRA adapter {name!r}: {module} has lora_{''.join(pair)} without its other half")
    a, b = pair[sides[0]], pair[sides[1]]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"LoRA adapter {name!r}: {module}'s lora_{sides[0]} {tuple(a.shape)} and lora_{sides[1]} "
                           f"{tuple(b.shape)} are not a rank-r pair")
    return a, b


def adapter_of(name: str, path: Path, weights: dict) -> LoRAAdapter:
    """The adapter of these per-module (A, B) pairs, its rank their largest; AdapterError for none."""
    if not weights:
        raise AdapterError(f"LoRA adapter {name!r}: {path} holds no LoRA weights")
    return LoRAAdapter(name, str(path), max(a.shape[0] for a, _ in weights.values()), weights)


def _check_config(name: str, config: dict) -> None:
    """What of PEFT's LoRA config this engine does not apply: refused, named."""
    if not isinstance(config, dict):
        raise AdapterError(f"LoRA adapter {name!r}: adapter_config.json is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"LoRA adapter {name!r} is a {kind} adapter; only LoRA is served")
    if "r" not in config:
        raise AdapterError(f"LoRA adapter {name!r}: adapter_config.json gives no rank (r)")
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (whole modules trained beside it)"),
                      ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern"),
                      ("layers_pattern", "layers_pattern"), ("megatron_config", "megatron_config")):
        if config.get(key):
            raise AdapterError(f"LoRA adapter {name!r} uses {what}, which this server does not apply")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"LoRA adapter {name!r} trains biases (bias={config['bias']!r}), which this server "
                           "does not apply")


def _tensors(name: str, folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file))
        if bin_file.is_file():
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(key, str) for key in tensors):
                raise AdapterError(f"LoRA adapter {name!r}: {bin_file} is not a state dict (names to tensors)")
            return tensors
    except AdapterError:
        raise
    except Exception as exc:  # a truncated or foreign file: named, not a traceback
        raise AdapterError(f"LoRA adapter {name!r}: cannot read its weights: {type(exc).__name__}: {exc}") from None
    raise AdapterError(f"LoRA adapter {name!r}: {folder} holds no adapter_model.safetensors or adapter_model.bin")
