"""PEFT LoRA adapters written for tests (random pairs, PEFT's file layout and key names), and the
reference they are checked against: transformers' model with each pair merged into its weights."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3's checkpoint names


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """A Llama-family layer's projections: module -> (out, in) (Phi-3's fused ones too)."""
    q, kv, hidden, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, \
        cfg.intermediate_size
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
            "qkv_proj": (q + 2 * kv, hidden), "gate_up_proj": (2 * inter, hidden)}


def write_adapter(folder: Path, cfg, modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  layers=None, rank: int = 8, alpha: float = 16.0, std: float = 0.05, seed: int = 0,
                  **config) -> Path:
    """A PEFT adapter folder for a model of config `cfg` (engine.config.ModelConfig): random A and B
    for `modules` of `layers` (default: every layer); `config`: more adapter_config.json keys."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = projection_shapes(cfg)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_layers) if layers is None else layers:
        for module in modules:
            out, inp = shapes[module]
            where = "self_attn" if module in ATTENTION + ("qkv_proj",) else "mlp"
            key = f"base_model.model.model.layers.{i}.{where}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=generator) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * std
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules), "bias": "none",
         "lora_dropout": 0.0, "task_type": "CAUSAL_LM", **config}))
    return folder


def merged_model(hf_model, folder: Path, times: float = 1.0):
    """A copy of transformers' model with the adapter in `folder` merged: W + times (alpha / r) B A."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    scale = times * config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    merged = copy.deepcopy(hf_model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                params[module + ".weight"] += scale * (b @ a)
    return merged


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf_adapter(path: Path, folder: Path, cfg, dtype=np.float32, alpha: float | None = None) -> Path:
    """The PEFT adapter in `folder` as llama.cpp's convert_lora_to_gguf.py writes it for a Llama
    model: `blk.N.<name>.weight.lora_a` / `.lora_b` in `dtype`, B's rows of q and k in llama.cpp's
    rotary order, `adapter.lora.alpha` (the adapter's, or `alpha`)."""
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    writer = GGUFWriter(str(path), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(config["lora_alpha"] if alpha is None else alpha))
    for key, value in sorted(tensors.items()):
        layer, module, side = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])"
                                           r"\.weight", key).groups()
        if side == "B" and module in ("q_proj", "k_proj"):
            heads = cfg.num_heads if module == "q_proj" else cfg.num_kv_heads
            value = value.reshape(heads, 2, value.shape[0] // heads // 2, value.shape[1]).swapaxes(1, 2) \
                .reshape(value.shape)
        writer.add_tensor(f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_{side.lower()}",
                          value.numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
