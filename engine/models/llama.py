"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), readable top to bottom.

Per layer: h = x + Attn(norm(x)); out = h + FFN(norm2(h)). The second line goes through the
step's FFN gate (`engine/skip/`), which decides per row whether the FFN runs at all.
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.kv.cache import KVCache
from engine.kv.metadata import AttentionMetadata
from engine.models.rope import RotaryEmbedding
from engine.quant import to_device


class LlamaLayer:
    kind = "llama"  # what a backend's fused decode path must implement to run this layer
    rope_kind = "global"  # which of the model's rotary tables this layer uses
    window: int | None = None  # sliding-window attention span (None = full)
    softcap: float | None = None  # attention scores soft-capped at this value (Gemma 2; None = not)
    activation = "silu"  # the FFN's gated activation, act(gate) * up
    # the row blocks of the fused projections, as the checkpoint names them
    qkv_names = tuple(f"self_attn.{p}_proj" for p in "qkv")
    gate_up_names = ("mlp.gate_proj", "mlp.up_proj")

    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int, ops):
        def w(name, dtype=dtype):
            return weights[prefix + name].to(device=device, dtype=dtype)

        def maybe(name):
            return w(name) if prefix + name in weights else None

        def linear(*parts, bias=None):  # one fused projection from its row blocks (named, or given), dense or quantized
            return ops.linear([to_device(weights[prefix + p] if isinstance(p, str) else p, device, dtype)
                               for p in parts], None if bias is None else bias.to(device))

        self.cfg, self.ops = cfg, ops
        if cfg.model_type in ("mistral", "mixtral") and cfg.sliding_window:  # Mistral 7B v0.1 (later ones: null)
            self.window = cfg.sliding_window
        self.scale = cfg.head_dim ** -0.5  # attention's
        self.input_norm = w("input_layernorm.weight", act_dtype)
        self.post_attn_norm = w("post_attention_layernorm.weight", act_dtype)
        # fused projections: one matmul for q|k|v and one for gate|up
        biases = [maybe(f"{name}.bias") for name in self.qkv_names]
        self.qkv = linear(*(f"{name}.weight" for name in self.qkv_names),
                          bias=torch.cat(biases) if all(b is not None for b in biases) else None)
        self.o_proj = linear("self_attn.o_proj.weight", bias=maybe("self_attn.o_proj.bias"))  # gpt-oss's
        self.build_ffn(weights, prefix, linear)

    def build_ffn(self, weights: dict, prefix: str, linear) -> None:
        """The FFN's projections (`linear(*parts)`: one projection from row blocks, each named in
        the checkpoint or given as a tensor)."""
        self.gate_up = linear(*(f"{name}.weight" for name in self.gate_up_names))
        self.down = linear("mlp.down_proj.weight")

    def attention(self, x, rope, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
        cfg, ops = self.cfg, self.ops
        n = x.shape[0]
        qkv = self.qkv(ops.rms_norm(x, self.input_norm, cfg.rms_norm_eps))
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
        qk = self.head_norms(qk.view(n, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim))
        qk = ops.rotary(qk, *rope)  # q and k at once
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        v = v.view(n, cfg.num_kv_heads, cfg.head_dim)
        return self.o_proj(self.attend(q, k, v, k_cache, v_cache, meta))

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """q [N, H, D], the new k and v [N, KV, D] -> the attention's output [N, H*D]."""
        return self.ops.attention(q, k, v, k_cache, v_cache, meta, self.scale, self.window)

    def head_norms(self, qk: torch.Tensor) -> torch.Tensor:
        """The q and k heads [N, q heads + k heads, D] before the rotation: as they are (Qwen3
        norms each head)."""
        return qk

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN residual branch FFN(norm2(h)); the gate adds it to h (or skips it)."""
        ops = self.ops
        return self.down(ops.silu_mul(self.gate_up(ops.rms_norm(h, self.post_attn_norm, self.cfg.rms_norm_eps))))


def activation_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Activations, norms, attention and the KV cache: fp32 on CPU whatever the weights are (CPU
    bf16 elementwise ops and bf16 attention are slower than fp32 there), the weight dtype on GPUs."""
    return torch.float32 if device.type == "cpu" else dtype


class LlamaModel:
    layer_class = LlamaLayer

    def __init__(self, cfg: ModelConfig, weights: dict, device, dtype, max_len: int, ops):
        self.cfg, self.device, self.dtype, self.ops = cfg, torch.device(device), dtype, ops
        self.act_dtype = act = activation_dtype(self.device, dtype)
        # a quantized embedding stays quantized: lookups dequantize their rows, a tied lm_head reads it
        self.embed = to_device(weights["model.embed_tokens.weight"], device, dtype)
        head = weights.get("lm_head.weight")
        tied = head is None or cfg.tie_word_embeddings
        self.lm_head = ops.linear([self.embed if tied else to_device(head, device, dtype)])
        if tied:  # a layer that keeps the matrix in a layout of its own serves the lookups from it too
            self.embed = getattr(self.lm_head, "embedding", self.embed)
        self.norm = weights["model.norm.weight"].to(device=device, dtype=act)
        self.layers = [self.layer_class(cfg, weights, f"model.layers.{i}.", device, dtype, act, i, ops)
                       for i in range(cfg.num_layers)]
        self.ropes = {"global": RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, max_len, device, act)}
        self.fused_decode = None  # the backend's whole-step decode path, set by the runner where it has one

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids].to(self.act_dtype)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache, gate,
                per_op: bool = False, adapters: list[int] | None = None) -> torch.Tensor:
        """input_ids: [N] -> final hidden states [N, hidden] (normed); `gate` runs or skips each FFN.
        `per_op`: every projection through the layers' own objects, never the backend's fused calls
        (LoRA adapters' rows where the fused decode step does not take them). `adapters`: each row's
        LoRA adapter slot, for the fused decode step (which takes them: the runner asked)."""
        x = self.embed_tokens(input_ids)
        fused = None if per_op else self.fused_decode
        if fused is not None and not meta.is_prefill:
            return self.final_norm(fused(x, meta, gate, adapters))
        assert adapters is None, "adapters go to the fused decode step (else: per_op, in LoRARegistry.applied)"
        ropes = {kind: rope(meta.positions) for kind, rope in self.ropes.items()}
        # the FFN branches: the backend's where it has its own for a forward (a mixture's experts in
        # one native call; adapters leave experts alone), else (None) the layers' own
        ffns = self.fused_decode.forward_ffns if self.fused_decode is not None else [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            h = x + layer.attention(x, ropes[layer.rope_kind], meta, kv.k[i], kv.v[i])
            x = gate(i, h, ffns[i] or layer.ffn)
        return self.final_norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def ffn_linears(self, layer) -> list:
        """A layer's FFN projections."""
        return [layer.gate_up, layer.down]

    def ffn_bytes(self, layer) -> float:
        """Bytes of a layer's FFN weights one decoded token reads."""
        return sum(lin.nbytes() for lin in self.ffn_linears(layer))

    def weight_bytes(self) -> dict:
        """Bytes of weights read per decoded token, split by part (for the bandwidth bound)."""
        return {"ffn": int(sum(self.ffn_bytes(layer) for layer in self.layers)),
                "attention": sum(layer.qkv.nbytes() + layer.o_proj.nbytes() for layer in self.layers),
                "lm_head": self.lm_head.nbytes()}

    def weight_formats(self) -> dict[str, str]:
        """Weight format -> the kernel path that runs it (logged at load)."""
        linears = [self.lm_head] + [lin for layer in self.layers
                                    for lin in (layer.qkv, layer.o_proj, *self.ffn_linears(layer))]
        return {lin.format: lin.backend for lin in linears}
