"""The decode step of the CUDA backend for Llama-family, Qwen3, Gemma 2/3 and mixture-of-experts
(Qwen3-MoE, Mixtral, gpt-oss) layers: Triton kernels, the FFN skip decided on the device, replayed as a CUDA
graph per batch bucket (graphs.py).

Per layer, reading only the static buffers of graphs.py (so the step can be captured) and never
synchronizing with the host:

    rmsnorm -> q|k|v projection (cuBLAS) -> Qwen3, Gemma 3: each q and k head normed in place ->
    rotary (the layer's table: Gemma 3's sliding layers have their own) on q in place, on k as it
    goes into the cache with v (one kernel; padded rows write nothing) -> paged decode attention
    through the block tables (over the layer's window where it has one; Gemma 2's capped scores)
    -> o_proj (cuBLAS) -> residual add fused with the FFN's rmsnorm (Gemma: the attention's
    output normed first, in the same kernel) -> the FFN (Gemma: its output normed before it joins
    the residual; a mixture of experts: the router, then the chosen experts on routed kernels,
    masked_moe.py)

The embedding lookup, the rotary rows and the final norm are in the step as well, so a replay is
the whole decode forward. The FFN comes in two variants, each with its own graphs:
- "gated", for steps where some row may skip: the device skip gate, whose masked FFN kernels
  read no weight for a layer that no row runs. The skip rule is the step's gate's (a `RuleGate`:
  each row's RowSkip, and the quorum of the policy this step was built for). The exact skips are
  read once, after the step, when the runner asks the gate for its counts.
- "dense", for steps where no row may (a `DenseGate`; what every request without a skip budget
  gets): none of the gate's kernels, and each FFN product on cuBLAS (Llama's down projection
  adding into the residual, beta = 1) or on the masked kernel with every row running, whichever
  ran it faster on this card at start (tile_tuning.py; cuBLAS until measured).

Prefill, and decode steps this one does not take (more rows than the buffers hold, a gate that
decides in Python, e.g. calibration's recorder), run the model's torch path.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.backends.cuda.decode_attention import paged_decode_attention
from engine.backends.cuda.device_gate import DeviceSkipGate
from engine.backends.cuda.gated_activation import ACTIVATIONS
from engine.backends.cuda.graphs import DecodeBatch, DecodeGraphs, DecodeInputs, StaticDecodeBuffers
from engine.backends.cuda.masked_ffn import MaskedFFN
from engine.backends.cuda.masked_linear import masked_linear
from engine.backends.cuda.masked_moe import MaskedMoE
from engine.backends.cuda.rms_norm import add_rms_norm, head_rms_norm, norm_add, rms_norm
from engine.backends.cuda.rotary_kv import rotary_and_write_kv
from engine.backends.cuda.tile_tuning import MaskedProduct, prefer_masked, tune_masked_linear
from engine.backends.torch_backend import PlainLinear
from engine.config import SkipConfig
from engine.skip.base import RuleGate

GEMMA = ("gemma2", "gemma3")  # four norms a layer: the attention's and the FFN's outputs normed too
MIXTURES = ("qwen3_moe", "mixtral", "gpt_oss")  # a router and experts in place of the FFN
KINDS = ("llama", "qwen3", *GEMMA, *MIXTURES)


def layer_ffn(layer, eps: float) -> MaskedFFN | MaskedMoE:
    """A layer's FFN on the masked kernels, with its input norm (Llama's post-attention norm;
    Gemma's pre-FFN norm, and its post-FFN norm on the output)."""
    if layer.kind in MIXTURES:
        return MaskedMoE(layer, layer.post_attn_norm, eps)
    gemma = layer.kind in GEMMA
    return MaskedFFN(layer.pre_ffn_norm if gemma else layer.post_attn_norm, eps, layer.gate_up.weight,
                     layer.down.weight, layer.activation, layer.post_ffn_norm if gemma else None)


class DecodeStep:
    def __init__(self, model, kv, max_batch: int, max_blocks: int, skip: SkipConfig, quorum: float | None,
                 may_skip: bool = True):
        """model: a model that `fits`; kv: its KV cache; max_batch rows and max_blocks blocks a
        row at most (the static buffers' size); skip: cold layers; quorum: the policy's rule;
        may_skip: whether any row may ever skip (where not, no gated variant is built or captured)."""
        cfg = model.cfg
        self.model, self.kv, self.cfg = model, kv, cfg
        # Llama's post-attention norm is its FFN's input norm; Gemma's norms the attention's output
        self.attn_out_norms = [layer.post_attn_norm if layer.kind in GEMMA else None for layer in model.layers]
        self.ffns = [layer_ffn(layer, cfg.rms_norm_eps) for layer in model.layers]
        self.buffers = StaticDecodeBuffers(max_batch, max_blocks, kv.block_size, kv.k.device)
        self.gate = DeviceSkipGate(self.buffers.max_skips, self.buffers.thresholds, cfg.num_layers,
                                   skip.cold_start, skip.cold_end, quorum)
        self.quorum, self.may_skip = quorum, may_skip
        forwards = {"dense": functools.partial(self.forward, gated=False)}
        if may_skip:
            forwards["gated"] = functools.partial(self.forward, gated=True)
        self.graphs = DecodeGraphs(forwards, self.buffers)  # eager until `graphs.capture()`
        self.tuning: list[dict] = []  # `tune()`'s choices and timings

    def tune(self) -> list[dict]:
        """Measures the masked FFN kernels' tiles for this GPU and these weights at every bucket's
        row count (tile_tuning.py): before any capture, as timing waits for the device. The
        routed experts' kernels run on their default tiles."""
        ffn = self.ffns[0]  # every layer's weights have the same shapes
        if not isinstance(ffn, MaskedFFN):
            return self.tuning
        products = [MaskedProduct(ffn.gate_up_weight),
                    MaskedProduct(ffn.down_weight, ffn.activation, residual=ffn.out_norm_weight is None)]
        self.tuning = tune_masked_linear(products, self.graphs.buckets)
        return self.tuning

    @staticmethod
    def fits(model, kv) -> bool:
        """Llama (Mistral 7B v0.1's and Phi-3's sliding windows and Phi-4-mini's partial rotary
        too), Qwen3, Gemma 2/3, Qwen3-MoE, Mixtral or gpt-oss layers with dense weights in the activations'
        dtype, and a KV cache in that dtype too."""
        act = model.act_dtype
        if not all(layer.kind in KINDS for layer in model.layers):
            return False
        linears = [lin for layer in model.layers for lin in (layer.qkv, layer.o_proj, *model.ffn_linears(layer))]
        return (isinstance(model.embed, torch.Tensor) and kv.k.dtype == act
                and all(isinstance(lin, PlainLinear) and lin.dtype == act and lin.weight.is_contiguous()
                        for lin in linears))

    def takes(self, rows: int, block_tables: list[list[int]], gate) -> bool:
        """Whether this step runs a decode of `rows` rows with `gate`: the buffers hold them, and
        the gate is dense or a rule this step's device gate runs."""
        dense = not gate.acts_per_layer
        return (rows <= self.buffers.max_batch and max(map(len, block_tables)) <= self.buffers.max_blocks
                and (dense or (self.may_skip and isinstance(gate, RuleGate) and gate.quorum == self.quorum)))

    def __call__(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]], gate
                 ) -> torch.Tensor:
        """One token per row at `positions` -> final hidden states [rows, hidden] (normed), valid
        until the next step. A rule gate's counts are this step's from then on."""
        rows = len(token_ids)
        settings = gate.rows if gate.acts_per_layer else None
        max_skips = [r.max_skips for r in settings] if settings else [0] * rows
        thresholds = [r.threshold for r in settings] if settings else [float("inf")] * rows
        hidden = self.graphs.run(DecodeInputs(token_ids, positions, block_tables, max_skips, thresholds),
                                 "gated" if settings else "dense")
        if settings:
            gate.count_with(self.gate)
        return hidden

    def forward(self, batch: DecodeBatch, gated: bool) -> torch.Tensor:
        """The step on the static buffers (captured as a graph, or run as it is); `gated`: the FFNs
        through the device skip gate, else every FFN run (`dense_ffn`)."""
        model, cfg, kv = self.model, self.cfg, self.kv
        eps, heads, kv_heads, head_dim = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rows = batch.token_ids.shape[0]
        first = self.ffns[0]  # every layer's FFN is of one kind and has the same shapes: one choice a step
        if gated:
            self.gate.reset()
        elif isinstance(first, MaskedFFN):
            masked = (prefer_masked(first.gate_up_weight, rows, None),
                      prefer_masked(first.down_weight, rows, first.activation))
        rotary = {kind: (rope.cos[batch.positions], rope.sin[batch.positions])  # [rows, rotary_dim] each
                  for kind, rope in model.ropes.items()}
        # a mixture's rows where every row runs (dense steps, cold layers): a bucket's padded rows
        # (context 0) choose no expert, so they read no expert's weight the real rows did not choose
        live = (batch.context_lens > 0).to(torch.int32) if isinstance(first, MaskedMoE) else None
        x = model.embed_tokens(batch.token_ids)
        for i, layer in enumerate(model.layers):
            ffn = self.ffns[i]
            qkv = F.linear(rms_norm(x, layer.input_norm, eps), layer.qkv.weight, layer.qkv.bias)
            qkv = qkv.view(rows, heads + 2 * kv_heads, head_dim)
            if getattr(layer, "q_norm", None) is not None:  # per-head norms before the rotation
                head_rms_norm(qkv[:, :heads], layer.q_norm, eps)
                head_rms_norm(qkv[:, heads:heads + kv_heads], layer.k_norm, eps)
            rotary_and_write_kv(qkv, *rotary[layer.rope_kind], kv.k[i], kv.v[i], batch.slots, heads, kv_heads)
            attn = paged_decode_attention(qkv[:, :heads], kv.k[i], kv.v[i], batch.block_tables, batch.context_lens,
                                          layer.scale, layer.window, softcap=layer.softcap,
                                          sinks=getattr(layer, "sinks", None))
            normed, h = add_rms_norm(F.linear(attn, layer.o_proj.weight, layer.o_proj.bias), x, ffn.norm_weight, eps,
                                     x_weight=self.attn_out_norms[i])
            if isinstance(ffn, MaskedMoE):
                def branch(h, run, ffn=ffn, normed=normed):
                    return ffn(h, live if run is None else run, normed)

                x = self.gate(i, h, branch) if gated else branch(h, None)
            elif gated:
                x = self.gate(i, h, functools.partial(ffn, normed=normed))
            else:
                x = self.dense_ffn(ffn, h, normed, *masked)
        return rms_norm(x, model.norm, eps)

    @staticmethod
    def dense_ffn(ffn: MaskedFFN, h: torch.Tensor, normed: torch.Tensor, masked_gate_up: bool, masked_down: bool
                  ) -> torch.Tensor:
        """h + FFN(normed) with every row running, in place in h (this layer's own): each product
        on the masked kernel where it ran faster than cuBLAS on this card at start
        (tile_tuning.prefer_masked: the activation fused into its loads), else on cuBLAS (Llama's
        sum in its epilogue; Gemma's in its post-FFN norm's kernel)."""
        w_gu, w_down, act = ffn.gate_up_weight, ffn.down_weight, ffn.activation
        gate_up = masked_linear(normed, w_gu) if masked_gate_up else F.linear(normed, w_gu)
        if ffn.out_norm_weight is not None:
            down = masked_linear(gate_up, w_down, activation=act) if masked_down else \
                F.linear(ACTIVATIONS[act](gate_up), w_down)
            return norm_add(down, ffn.out_norm_weight, h, ffn.eps, summed=h)
        if masked_down:
            return masked_linear(gate_up, w_down, residual=h, out=h, activation=act)
        return h.addmm_(ACTIVATIONS[act](gate_up), w_down.t())
