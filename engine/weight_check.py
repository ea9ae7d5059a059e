"""A checkpoint's tensors against its config, before a model is built from them.

The models take each tensor as the file declares it, and the CPU kernels trust those shapes: a
GGUF whose embedding is narrower than `hidden_size` was served until its first request, which then
killed the server (a segfault, or glibc's "double free"); a final norm of the wrong width read past
its buffer and answered garbage; a `block_count` below the file's layers left the last ones out.
Here each tensor that a layer of every supported architecture names alike is checked against the
shape the config gives it, and every layer the config counts must be there, and no other.
Matrices of experts are not checked (each architecture lays them out its own way).
"""
from __future__ import annotations

import re

from engine.config import ModelConfig

LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A layer's tensors (name within the layer -> shape: rows first, as HF's) that share one shape
    in every architecture that has them."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {f"{norm}.weight": (h,) for norm in ("input_layernorm", "post_attention_layernorm",
                                                  "pre_feedforward_layernorm", "post_feedforward_layernorm")}
    shapes.update({"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                   "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                   "self_attn.qkv_proj.weight": (q + 2 * kv, h), "self_attn.q_proj.bias": (q,),
                   "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,),
                   "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    if not cfg.num_experts:
        i = cfg.intermediate_size
        shapes.update({"mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
                       "mlp.down_proj.weight": (h, i), "mlp.gate_up_proj.weight": (2 * i, h)})
    return shapes


def check_weights(cfg: ModelConfig, weights: dict, source) -> None:
    """Raise ValueError naming the first tensor whose shape is not the config's, a tensor missing
    that every model needs, or layers that the config does not count. `weights`: HF name -> tensor
    or QuantWeight (anything with `.shape`); `source`: the file or folder, for the message."""
    def wrong(name: str, want: tuple[int, ...]) -> None:
        got = tuple(weights[name].shape)
        if got != want:
            raise ValueError(f"{source}: tensor {name} is {list(got)}, its config needs {list(want)} (hidden size "
                             f"{cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}, {cfg.num_kv_heads} KV "
                             f"heads, FFN {cfg.intermediate_size}): the file is damaged or does not match its config")

    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if name not in weights:
            raise ValueError(f"{source}: no tensor {name}: the file is incomplete (the first part of a split model?)")
    h = cfg.hidden_size
    wrong("model.norm.weight", (h,))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights and (len(weights[name].shape) != 2 or weights[name].shape[1] != h
                                or weights[name].shape[0] < 1):
            wrong(name, (cfg.vocab_size, h))
    shapes, layers = layer_shapes(cfg), set()
    for name in weights:
        match = LAYER.fullmatch(name)
        if match is None:
            continue
        layers.add(int(match[1]))
        if match[2] in shapes:
            wrong(name, shapes[match[2]])
    missing = sorted(set(range(cfg.num_layers)) - layers)
    extra = sorted(layers - set(range(cfg.num_layers)))
    if missing or extra:
        raise ValueError(f"{source}: its config counts {cfg.num_layers} layers, but the file has "
                         + (f"no tensors for layer(s) {_listed(missing)}" if missing else "")
                         + (" and " if missing and extra else "")
                         + (f"tensors for layer(s) {_listed(extra)}" if extra else ""))
    needed = ["input_layernorm.weight", "self_attn.o_proj.weight"] + ([] if cfg.num_experts else ["mlp.down_proj.weight"])
    for index in range(cfg.num_layers):
        prefix = f"model.layers.{index}."
        for part in needed:
            if prefix + part not in weights:
                raise ValueError(f"{source}: no tensor {prefix + part}: the file is incomplete")
        if prefix + "self_attn.q_proj.weight" not in weights and prefix + "self_attn.qkv_proj.weight" not in weights:
            raise ValueError(f"{source}: no tensor {prefix}self_attn.q_proj.weight: the file is incomplete")


def _listed(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:8])) + (f" (and {len(indices) - 8} more)" if len(indices) > 8 else "")
