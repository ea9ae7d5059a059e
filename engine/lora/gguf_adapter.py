"""A LoRA adapter as llama.cpp's `convert_lora_to_gguf.py` writes it (what `llama-server --lora`
reads): a GGUF of `general.type` adapter whose tensors are `blk.N.<projection>.weight.lora_a` and
`.lora_b`, with `adapter.lora.alpha`. Read into the same per-module pairs as a PEFT folder
(engine/lora/adapter.py): llama.cpp's tensor names back to the checkpoint's, B's rows of q and k
put back in the checkpoint's order where the converter reordered them for llama.cpp's rotary (as
the model's own weights are, engine/gguf_weights.py), the scale `alpha / r` (1 where alpha is 0,
as llama.cpp takes it) folded into B."""
from __future__ import annotations

import re
from pathlib import Path

from engine.config import ModelConfig
from engine.gguf_file import GGUFFile
from engine.gguf_weights import ROTARY_PERMUTED, dense_tensor, hf_name, rotary_order
from engine.lora.adapter import PROJECTIONS, LoRAAdapter, adapter_of, check_rank, checked_pair
from engine.lora.errors import AdapterError

TENSOR = re.compile(r"(blk\.\d+\.\w+\.weight)\.lora_([ab])")


def read_gguf_adapter(name: str, path: Path, cfg: ModelConfig, max_rank: int | None = None) -> LoRAAdapter:
    try:
        gguf = GGUFFile(path)
    except ValueError as exc:
        raise AdapterError(f"LoRA adapter {name!r}: {exc}") from None
    kind = (gguf.fields.get("general.type"), gguf.fields.get("adapter.type"))
    if kind != ("adapter", "lora"):
        raise AdapterError(f"LoRA adapter {name!r}: {path} is not a LoRA adapter GGUF (general.type "
                           f"{kind[0]!r}, adapter.type {kind[1]!r}; llama.cpp's convert_lora_to_gguf.py writes one)")
    if "adapter.alora.invocation_tokens" in gguf.array_keys | set(gguf.fields):
        raise AdapterError(f"LoRA adapter {name!r} is an activated LoRA (applied after its invocation tokens only), "
                           "which this server does not apply")
    arch = gguf.fields.get("general.architecture", "llama")
    alpha = gguf.fields.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"LoRA adapter {name!r}: adapter.lora.alpha is not a number: {alpha!r}")
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    pairs: dict[str, dict[str, object]] = {}
    for tensor in gguf.tensors:
        match = TENSOR.fullmatch(tensor.name)
        hf = hf_name(match[1], arch) if match else None
        if hf is not None and "{}" in hf:
            raise AdapterError(f"LoRA adapter {name!r} changes {tensor.name}, a mixture's experts, which this "
                               "server does not apply adapters to")
        if hf is None or hf.split(".")[-2] not in PROJECTIONS:
            raise AdapterError(f"LoRA adapter {name!r} changes {tensor.name}: only the decoder layers' projections "
                               "are served")
        try:
            value = dense_tensor(tensor.data, tensor.tensor_type, [int(d) for d in reversed(tensor.shape)])
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise AdapterError(f"LoRA adapter {name!r}: {tensor.name} ({tensor.tensor_type.name}) cannot be read: "
                               f"{exc}") from None
        pairs.setdefault(hf.removesuffix(".weight"), {})[match[2]] = value
    weights = {}
    for module, pair in pairs.items():
        a, b = checked_pair(name, module, pair, ("a", "b"))
        if a.shape[0] < 1:  # (its scale divides by it)
            raise AdapterError(f"LoRA adapter {name!r}: {module}'s lora_a and lora_b are of rank 0")
        projection = module.split(".")[-1]
        if arch in ROTARY_PERMUTED and projection in heads:
            if b.shape[0] % (2 * heads[projection]):
                raise AdapterError(f"LoRA adapter {name!r}: {module}'s lora_b has {b.shape[0]} rows, not this "
                                   f"model's {heads[projection]} heads (an adapter for another model?)")
            b = b[rotary_order(b.shape[0], heads[projection])]
        rank = a.shape[0]
        check_rank(name, rank, max_rank)
        weights[module] = (a.contiguous(), (b * (alpha / rank if alpha else 1.0)).contiguous())
    return adapter_of(name, path, weights)
