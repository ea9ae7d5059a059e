"""A GGUF model's weights with its matrices kept quantized, under the HF names the models use.

Matrices in a format of `engine/quant/formats.py` become `QuantWeight`s read from the GGUF's own
blocks; everything else (norms, biases, matrices in other formats) comes from the dense conversion
`engine/loader.py` already made, so architecture fixes transformers applies there (Gemma's norms)
stay in one place. llama.cpp stores Llama's q/k projections with the rows of each head reordered
for its rotary layout; that is a permutation of whole rows, undone here on the quantized rows.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from engine.quant import QuantWeight
from engine.quant.formats import SUPPORTED, to_weight

log = logging.getLogger("skipserve.loader")

# GGUF tensor name -> HF name (blk.N.* -> model.layers.N.*)
TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
IN_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROTARY_PERMUTED = {"llama", "mistral"}  # architectures whose q/k rows llama.cpp's converter reorders


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if match and match.group(2) in IN_LAYER:
        return f"model.layers.{match.group(1)}.{IN_LAYER[match.group(2)]}.weight"
    return None


def unpermute_rotary(weight: QuantWeight, heads: int) -> QuantWeight:
    """Undo llama.cpp's per-head row order (rows (half, 2) -> (2, half)) on q or k."""
    rows = weight.shape[0]
    half = rows // heads // 2
    order = torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)
    return weight.permute_rows(order)


def load_quantized(gguf_path: Path) -> dict[str, QuantWeight]:
    """The GGUF's matrices in a supported format, as HF name -> QuantWeight."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    heads = {"q_proj": _field(reader, f"{arch}.attention.head_count"),
             "k_proj": _field(reader, f"{arch}.attention.head_count_kv")}
    weights = {}
    for tensor in reader.tensors:
        kind, name = tensor.tensor_type.name, hf_name(tensor.name)
        if kind not in SUPPORTED or name is None:
            continue
        weight = to_weight(kind, np.asarray(tensor.data), int(tensor.shape[0]))
        projection = name.split(".")[-2]
        if arch in ROTARY_PERMUTED and projection in heads:
            weight = unpermute_rotary(weight, heads[projection])
        weights[name] = weight
    return weights


def load_weights(gguf_path: Path, hf_dir: Path) -> dict:
    """HF name -> QuantWeight for the quantized matrices, dense tensors (from `hf_dir`) for the rest."""
    from safetensors import safe_open

    weights: dict = load_quantized(gguf_path)
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in weights:
                    weights[key] = f.get_tensor(key)
    return weights


def _field(reader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return value.tobytes().decode() if value.dtype == np.uint8 else int(value[0])


def quantized_gguf(model: str, cache_dir: str | None, dtype: str, device) -> Path | None:
    """The GGUF to serve in its own quantization: `--dtype auto` on the CPU, a GGUF model, and the
    quantized kernels built for this CPU; else None (dense weights, as `dtype` says)."""
    from engine.loader import resolve_model_path
    from engine.native import quant_ops

    if dtype != "auto" or device.type != "cpu" or quant_ops.best_isa() is None:
        return None
    path = resolve_model_path(model, cache_dir)
    return path if path.suffix == ".gguf" else None
