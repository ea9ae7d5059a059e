"""Mixtral (Mixtral-8x7B, 8x22B): Mistral's layer with a mixture of experts in place of its FFN:
a router sends each token to the 2 of 8 SwiGLU experts it ranks highest, their outputs summed
with the softmax of the router's logits renormalized over the two (engine/models/moe.py's
SoftmaxRoutedExperts, which Qwen3-MoE shares). llama.cpp's files say `llama` with an expert
count (engine/loader.py makes the config a Mixtral one); the Hub's checkpoints name the experts
`block_sparse_moe.experts.{e}.w1 / w3 / w2`.
"""
from __future__ import annotations

from engine.models.llama import LlamaLayer, LlamaModel
from engine.models.moe import MixtureModel, SoftmaxRoutedExperts


class MixtralLayer(SoftmaxRoutedExperts, LlamaLayer):
    kind = "mixtral"


class MixtralModel(MixtureModel, LlamaModel):
    layer_class = MixtralLayer
