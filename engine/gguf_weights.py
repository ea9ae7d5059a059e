"""A GGUF model's weights with its matrices kept quantized, under the HF names the models use, read
from the file alone (no dense conversion: engine/loader.py writes one only for dense dtypes).

Matrices in a format of `engine/quant/formats.py` become `QuantWeight`s read from the GGUF's own
blocks; everything else (norms, biases, matrices in other formats: F16, BF16, F32, or quantized
ones the kernels do not take) is dequantized to fp32 by gguf-py, with the fixes transformers'
GGUF loader applies (each is checked against its dense conversion in the tests): llama.cpp stores
Llama's q/k projections with the rows of each head reordered for its rotary layout, undone here
(on the quantized rows too, a permutation of whole rows), and Gemma's norms as 1 + w.
"""
from __future__ import annotations

import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.gguf_file import GGUFFile
from engine.host_resources import available_memory
from engine.quant import QuantWeight
from engine.quant.formats import SUPPORTED, to_weight

log = logging.getLogger("skipserve.loader")

# GGUF tensor name -> HF name (blk.N.* -> model.layers.N.*)
TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight"}
IN_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    # mixture of experts: the router, and each expert's matrices (one [experts, rows, columns] tensor
    # each in the file, one matrix an expert here)
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.{}.gate_proj", "ffn_up_exps": "mlp.experts.{}.up_proj",
    "ffn_down_exps": "mlp.experts.{}.down_proj",
    # Qwen2-MoE's shared expert and its gate
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# Gemma's four norms a layer: llama.cpp's names for the second and third differ in meaning
GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
GEMMA = {"gemma2", "gemma3"}
# Phi-3 stores q|k|v and gate|up fused, as its checkpoints do
PHI3 = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# gpt-oss: its FFN's input norm, its router (with a bias) under transformers' names; the per-head
# attention sinks (a parameter of the attention, no `.weight` in transformers)
GPT_OSS = {"post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router"}
ROTARY_PERMUTED = {"llama"}  # architectures whose q/k rows llama.cpp's converter reorders (Mistral's files say llama)


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not match:
        # one tensor an expert (`blk.N.ffn_gate.E.weight`): llama.cpp's Mixtral files before it stacked them
        split = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight", gguf_name)
        return f"model.layers.{split[1]}.mlp.experts.{split[3]}.{split[2]}_proj.weight" if split else None
    layer, part, kind = match.groups()
    if part == "attn_sinks":
        return f"model.layers.{layer}.self_attn.sinks"
    own = GEMMA_NORMS if arch in GEMMA else PHI3 if arch == "phi3" else GPT_OSS if arch == "gpt-oss" else {}
    name = own.get(part) or IN_LAYER.get(part)
    return f"model.layers.{layer}.{name}.{kind}" if name else None


def unpermute_rotary(weight: QuantWeight, heads: int) -> QuantWeight:
    """Undo llama.cpp's per-head row order (rows (half, 2) -> (2, half)) on q or k."""
    return weight.permute_rows(rotary_order(weight.shape[0], heads))


def rotary_order(rows: int, heads: int) -> torch.Tensor:
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)


def load_weights(gguf_path: Path) -> dict:
    """HF name -> QuantWeight for the GGUF's matrices in a supported format, fp32 tensors for the
    rest; tensors no model reads (llama.cpp's rope_freqs, say) are left out. The tensors' blocks are
    decoded on the CPU threads at once (numpy, which lets go of the GIL: a 7B file's ~300 matrices
    would take tens of seconds one after another); the reorderings follow on this thread."""
    gguf = GGUFFile(gguf_path)
    arch = gguf.fields["general.architecture"]
    heads = {"q_proj": gguf.fields[f"{arch}.attention.head_count"],
             "k_proj": gguf.fields[f"{arch}.attention.head_count_kv"]}
    named = [(tensor, hf_name(tensor.name, arch)) for tensor in gguf.tensors]
    skipped = [tensor.name for tensor, name in named if name is None]
    named = [(tensor, name) for tensor, name in named if name is not None]
    check_expansion(gguf_path, [tensor for tensor, name in named if not _kept_quantized(tensor, name)])
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        decoded = list(pool.map(lambda item: _readable(gguf_path, item[0], _decoded, *item), named))
    weights = {}
    for (tensor, name), values in zip(named, decoded):
        for key, value in values:
            weights[key] = _readable(gguf_path, tensor, _reordered, value, name, arch, heads)
    if skipped:
        log.info("GGUF tensors no model reads, left out: %s", ", ".join(skipped))
    return weights


PLAIN = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}  # formats that are not llama.cpp's blocks


def _kept_quantized(tensor, name: str) -> bool:
    """Whether `_decoded` keeps the tensor in its blocks (else it becomes fp32)."""
    return tensor.tensor_type.name in SUPPORTED and name.endswith(".weight") and (len(tensor.shape) == 2
                                                                                  or "{}" in name)


def check_expansion(path, expanded: list) -> None:
    """The tensors that become fp32: a warning naming the block formats among them that the kernels
    do not read (an IQ2_XXS matrix takes 15.5x its size as fp32, a 2 GB 7B file ~28 GB), and a
    ValueError when all of them would not fit in the memory available now (else the kernel's OOM
    killer ends the load with no message)."""
    need = sum(4 * math.prod(map(int, t.shape)) for t in expanded)
    blocks = sorted({t.tensor_type.name for t in expanded} - PLAIN)
    free = available_memory()
    if free is not None and need > free:
        raise ValueError(f"{path}: its tensors in formats the quantized kernels do not read ("
                         + ", ".join(sorted({t.tensor_type.name for t in expanded})) + f") take {need / 2**30:.2f} GiB "
                         f"as fp32, more than the {free / 2**30:.2f} GiB available: use a file in "
                         + ", ".join(SUPPORTED))
    if blocks:
        log.warning("%s: matrices in %s are not read by the quantized kernels: they are expanded to fp32 "
                    "(%.2f GiB in all; formats the kernels read: %s)", Path(path).name, ", ".join(blocks),
                    need / 2**30, ", ".join(SUPPORTED))


def _readable(path, tensor, read, *args):
    """`read(*args)` for one tensor; what fails there (a shape the file got wrong) names the tensor."""
    try:
        return read(*args)
    except (ValueError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{path}: tensor {tensor.name} ({tensor.tensor_type.name}, dimensions "
                         f"{list(map(int, tensor.shape))}) cannot be read: {exc}") from None


def _reordered(value, name: str, arch: str, heads: dict):
    """A tensor as the models take it: llama.cpp's rotary row order undone, Gemma's 1 + w norms."""
    projection = name.split(".")[-2]
    if arch in ROTARY_PERMUTED and projection in heads and "{}" not in name:
        value = unpermute_rotary(value, heads[projection]) if isinstance(value, QuantWeight) \
            else value[rotary_order(value.shape[0], heads[projection])].contiguous()
    if arch in GEMMA and name.endswith("norm.weight"):
        value = value - 1.0
    return value


def _decoded(tensor, name: str) -> list[tuple[str, QuantWeight | torch.Tensor]]:
    """One tensor's (HF name, value) pairs as the file holds them (several for a stack of experts):
    QuantWeights for matrices in a supported format, fp32 tensors otherwise. numpy work only."""
    kind, quantized = tensor.tensor_type.name, _kept_quantized(tensor, name)
    if "{}" in name:  # an expert's matrix (or bias) each
        return [(name.format(expert), to_weight(kind, data, int(tensor.shape[0])) if quantized
                 else dense_tensor(data, tensor.tensor_type, [int(d) for d in reversed(tensor.shape[:-1])]))
                for expert, data in enumerate(np.asarray(tensor.data))]
    if quantized:
        return [(name, to_weight(kind, np.asarray(tensor.data), int(tensor.shape[0])))]
    return [(name, dense_tensor(tensor.data, tensor.tensor_type, [int(d) for d in reversed(tensor.shape)]))]


def dense_tensor(data, tensor_type, shape: list[int]) -> torch.Tensor:
    """A tensor's data (quantized or not) as fp32 of `shape` (GGUF lists dimensions innermost first:
    reversed here); a copy, as the file is mapped read-only."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(np.asarray(data), tensor_type), dtype=np.float32)).reshape(shape)


def quantized_gguf(model: str, cache_dir: str | None, dtype: str, device) -> Path | None:
    """The GGUF to serve in its own quantization: `--dtype auto` on the CPU, a GGUF model, and the
    quantized kernels built for this CPU; else None (dense weights, as `dtype` says)."""
    from engine.loader import resolve_model_path
    from engine.native import quant_ops

    if dtype != "auto" or device.type != "cpu" or quant_ops.best_isa() is None:
        return None
    path = resolve_model_path(model, cache_dir)
    return path if path.is_file() else None  # a GGUF (resolve_model_path takes no other file)
