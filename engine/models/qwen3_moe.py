"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, and in place of the FFN a router
and experts: each token's hidden state goes to the `num_experts_per_tok` experts its router ranks
highest (softmax over all experts, the chosen weights renormalized where `norm_topk_prob`), each
a SwiGLU FFN of `moe_intermediate_size`, and their outputs are summed with those weights
(engine/models/moe.py's SoftmaxRoutedExperts, which Mixtral shares).

The FFN branch the skip gate sees is that whole sum: a skipped FFN skips the router and every
expert of that token. An expert's projections are built as any projection (dense, or the GGUF's
own blocks on the CPU's quantized kernels). Experts run one after another over the rows routed to
them on the per-op path, and so does the CPU's native step, in one call a layer
(engine/native/routed_experts.cpp); the CUDA decode step runs the same routing (`route`) with
every chosen expert in one launch a projection (engine/backends/cuda/masked_moe.py).
"""
from __future__ import annotations

from engine.models.moe import MixtureModel, SoftmaxRoutedExperts
from engine.models.qwen3 import Qwen3Layer, Qwen3Model


class Qwen3MoeLayer(SoftmaxRoutedExperts, Qwen3Layer):
    kind = "qwen3_moe"


class Qwen3MoeModel(MixtureModel, Qwen3Model):
    layer_class = Qwen3MoeLayer
