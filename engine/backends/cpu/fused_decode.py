"""Decode steps on native layer calls (engine/native/decode_layers.cpp), for Llama-family, Qwen3,
Gemma 2, Gemma 3, Qwen3-MoE, Mixtral, Qwen2-MoE and gpt-oss layers (a mixture's FFN:
engine/native/routed_experts.cpp).

For models whose layers are of a kind the native step knows (`LAYER_KINDS`) with every projection
on native kernels (the dense GEMMs or the quantized GEMM; one layer's projections may mix them, and
one projection's row blocks too, as a GGUF's q and k in Q4_K beside v in Q6_K; a mixture's router and
every expert): a dense decode step in one call (`layers_step`), and a skipping step in one call
too when the gate's rule is FFN-SkipLLM's per-row rule, given as data (engine/skip/base.py's
RuleGate); otherwise per layer the attention branch (decode) and the FFN branch (any rows) for the
skip gate to choose between.
Same kernels as the per-op path, so the same bits (a mixture's routing weights, gpt-oss's clamped
SwiGLU and Qwen2-MoE's shared gate excepted: the native code computes them itself, see
routed_experts.cpp). Built once per model and KV cache (the layer table holds their addresses).
Rows of LoRA adapters run in the same calls: a second table gives each projection an adapter
changes with its adapters' pairs (weight_ref.h's LORA kind), each row's slot passed with the step.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from engine.backends.cpu.linear import Linear
from engine.backends.cpu.quant_linear import ConcatLinear, QuantLinear
from engine.lora.linear import LoRALinear
from engine.native import kernels
from engine.native.ops import cache_bits, cache_dtypes, check_decode_lengths
from engine.skip.base import RuleGate

DENSE, QUANTIZED, PARTS, LORA = 0, 1, 2, 3  # decode_layers.cpp's WeightRef kinds
LAYER_COLUMNS = 12  # a LayerRow's columns before its WeightRefs
REF_COLUMNS = 10  # a WeightRef's
# a LayerRow's columns after its WeightRefs: the attention's sinks, then a mixture's experts
TAIL_COLUMNS = ("sinks", "experts", "num_experts", "experts_per_token", "renormalize", "expert_inter", "swiglu",
                "shared", "shared_inter")
EXPERTS_COLUMN = LAYER_COLUMNS + 4 * REF_COLUMNS + TAIL_COLUMNS.index("experts")
SILU, GELU_TANH = 0, 1  # its LayerRow activations
LLAMA_NORMS = ("input_norm", None, "post_attn_norm", None, None, None)
QWEN3_NORMS = ("input_norm", None, "post_attn_norm", None, "q_norm", "k_norm")
# per layer kind: the activation, and the layer's norms by their role in a LayerRow (attention
# input, attention output, FFN input, FFN output, per-head q and k); None: the kind has no such norm.
# Mixtral's and Qwen3-MoE's are softmax-routed SwiGLU experts (engine/models/moe.py) after Mistral's
# and Qwen3's attention (Qwen2-MoE's: after Qwen2's, with a shared expert); gpt-oss's attention is
# Llama's with biases and sinks, its experts clamped SwiGLUs with biases.
LAYER_KINDS = {
    "llama": (SILU, LLAMA_NORMS),
    "qwen3": (SILU, QWEN3_NORMS),
    "mixtral": (SILU, LLAMA_NORMS),
    "qwen3_moe": (SILU, QWEN3_NORMS),
    "qwen2_moe": (SILU, LLAMA_NORMS),
    "gpt_oss": (SILU, LLAMA_NORMS),
    "gemma3": (GELU_TANH, ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm", "q_norm", "k_norm")),
    "gemma2": (GELU_TANH, ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm", None, None)),
}


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def layer_row(layer, k_cache: torch.Tensor, v_cache: torch.Tensor, keep: list) -> list[int] | None:
    """decode_layers.cpp's LayerRow of a layer: activation, window, rotary table and width, the six norms,
    the caches, then the projections' WeightRefs and a mixture's experts (`keep` holds the tables they
    point to); None where a projection has no native entry point (`weight_ref`)."""
    activation, norms = LAYER_KINDS[layer.kind]
    head = ([activation, layer.window or 0, int(layer.rope_kind == "local"), layer.cfg.rotary_dim]
            + [_address(getattr(layer, name) if name else None) for name in norms]
            + [k_cache.data_ptr(), v_cache.data_ptr()])
    assert len(head) == LAYER_COLUMNS
    refs = [weight_ref(lin, keep) for lin in (layer.qkv, layer.o_proj)]
    if not hasattr(layer, "experts"):
        refs += [weight_ref(layer.gate_up, keep), weight_ref(layer.down, keep)]
    if None in refs:
        return None
    attention = refs[0] + refs[1]
    sinks = _address(getattr(layer, "sinks", None))
    if not hasattr(layer, "experts"):
        return head + attention + refs[2] + refs[3] + [sinks] + [0] * (len(TAIL_COLUMNS) - 1)
    experts = torch.tensor([weight_ref(gate_up, keep) + weight_ref(down, keep) for gate_up, down in layer.experts],
                           dtype=torch.int64)
    keep.append(experts)
    cfg = layer.cfg
    swiglu = 0
    if layer.activation == "swiglu_clamped":  # gpt-oss's experts
        params = torch.tensor([cfg.swiglu_limit, cfg.swiglu_alpha], dtype=torch.float32)
        keep.append(params)
        swiglu = params.data_ptr()
    shared, shared_inter = 0, 0
    if hasattr(layer, "shared"):  # Qwen2-MoE's shared expert: gate|up, down, and its gate
        table = torch.tensor([weight_ref(lin, keep) for lin in (*layer.shared, layer.shared_gate)], dtype=torch.int64)
        keep.append(table)
        shared, shared_inter = table.data_ptr(), layer.shared[1].in_features
    tail = [sinks, experts.data_ptr(), len(layer.experts), cfg.num_experts_per_tok, int(layer.renormalized),
            layer.experts[0][1].in_features, swiglu, shared, shared_inter]
    assert len(tail) == len(TAIL_COLUMNS)
    return head + attention + weight_ref(layer.router, keep) + [0] * REF_COLUMNS + tail


def weight_ref(linear, keep: list | None = None) -> list[int] | None:
    """decode_layers.cpp's WeightRef of a projection (kind, kernel, weight, scale, offset, bias,
    bits, group, scale_bits, table), or None where its kernel has no native entry point (oneDNN). Row
    blocks of several layouts (ConcatLinear) point to a table of their parts' widths and WeightRefs,
    appended to `keep`, which must outlive the reference; so does a projection with LoRA adapters
    (the base's WeightRef, and each adapter's slot, rank and pairs' WeightRefs, the pairs kept too)."""
    if isinstance(linear, LoRALinear):
        base, adapters = weight_ref(linear.base, keep), list(linear.pairs.items())
        if not adapters or base is None:
            return base
        refs = [(slot, a.out_features, weight_ref(a), weight_ref(b)) for slot, (a, b) in adapters]
        if any(a is None or b is None for _, _, a, b in refs):
            return None
        base_ref = torch.tensor(base, dtype=torch.int64)
        table = torch.tensor([[slot, rank, *a, *b] for slot, rank, a, b in refs], dtype=torch.int64)
        if keep is not None:
            keep += [base_ref, table, adapters]
        return [LORA, 0, base_ref.data_ptr(), len(refs), table.data_ptr(), 0, 0, 0, 0, 0]
    if isinstance(linear, Linear) and linear.backend == "native":
        return [DENSE, ctypes.cast(linear.kernel, ctypes.c_void_p).value, _address(linear.weight), 0, 0,
                _address(linear.bias), 0, 0, 0, 0]
    if isinstance(linear, QuantLinear):
        w = linear.weight
        return [QUANTIZED, ctypes.cast(linear.kernel, ctypes.c_void_p).value, _address(w.q), _address(w.scale),
                _address(w.offset), _address(linear.bias), w.bits, w.group, w.scale_bits, _address(w.table)]
    if isinstance(linear, ConcatLinear):
        refs = [weight_ref(part, keep) for part in linear.parts]
        if any(ref is None for ref in refs):
            return None
        table = torch.tensor([[part.out_features, *ref] for part, ref in zip(linear.parts, refs)], dtype=torch.int64)
        if keep is not None:
            keep.append(table)
        return [PARTS, 0, table.data_ptr(), len(refs), 0, 0, 0, 0, 0, 0]
    return None


class FusedDecode:
    def __init__(self, model, kv):
        self.cfg, self.kv = model.cfg, kv
        self.ropes = [model.ropes["global"], model.ropes.get("local", model.ropes["global"])]
        layers = model.layers
        self.scale, self.softcap = layers[0].scale, layers[0].softcap or 0.0
        self.part_tables: list[torch.Tensor] = []  # the table points to these (projections in parts)
        self.table = torch.tensor([layer_row(layer, kv.k[i], kv.v[i], self.part_tables)
                                   for i, layer in enumerate(layers)], dtype=torch.int64)
        self.layers = layers  # the table points into their tensors
        self.lora = None  # the served adapters (LoRARegistry), once `serve_adapters` named them
        # the layer table with their pairs: (their version, the table or None, what it points to)
        self._adapter_table: tuple[int, torch.Tensor | None, list] | None = None
        # the dense FFN's width, for the step's scratch buffers (a mixture's experts keep their own)
        self.inter = 0 if all(hasattr(layer, "experts") for layer in layers) else model.cfg.intermediate_size
        self.ffns = [functools.partial(self.ffn_branch, i) for i in range(len(layers))]
        # a forward's (prefill's) FFN branches: a mixture's in native calls (the experts in one call: 1.26x
        # at 128 tokens, 1.06-1.09x at 300-600 on bench/moe_cpu.py's 8-layer file, ad hoc), None for a
        # dense one: the layer's own (the same kernels; native, 0.93-0.98x on SmolLM2, ad hoc)
        self.forward_ffns = [self.ffns[i] if hasattr(layer, "experts") else None for i, layer in enumerate(layers)]

    @staticmethod
    def fits(model, kv) -> bool:
        """Layers of the kinds the native step knows, one attention scale and cap, fp32 activations, a cache
        the native attention reads (fp32, or fp16 where built), every projection on a native kernel."""
        layers = model.layers
        if not all(layer.kind in LAYER_KINDS for layer in layers):
            return False
        linears = [lin for layer in layers for lin in (layer.qkv, layer.o_proj, *model.ffn_linears(layer))]
        return (model.act_dtype == torch.float32 and kv.k.dtype in cache_dtypes()
                and len({(layer.scale, layer.softcap) for layer in layers}) == 1
                and all(weight_ref(lin) is not None for lin in linears))

    def serve_adapters(self, registry) -> None:
        """Rows of the registry's adapters may come (the projections are its LoRALinears from now on)."""
        self.lora = registry
        registry.on_remove.append(self.forget_adapters)

    def forget_adapters(self) -> None:
        """An adapter's pairs were removed: the table that points to them goes now, and its weights with
        it (the next step with an adapter's row builds the table again). The engine thread, between steps."""
        self._adapter_table = None

    def takes_adapters(self, gate) -> bool:
        """Whether a step with rows of adapters runs here with this gate: in one call (no gate acting per
        layer, or FFN-SkipLLM's rule), every adapter's pairs on native kernels."""
        one_call = not gate.acts_per_layer or (isinstance(gate, RuleGate) and gate.quorum is None)
        return one_call and self.lora is not None and self._adapters()[1] is not None

    def _adapters(self) -> tuple[int, torch.Tensor | None, list]:
        """The layer table with the adapters' pairs (None where a pair has no native kernel), built
        again when one was loaded since (their pairs kept alive while it points to them)."""
        version = self.lora.version
        if self._adapter_table is None or self._adapter_table[0] != version:
            self._adapter_table = None  # the previous pairs go before the new table is built
            keep: list = []
            rows = [layer_row(layer, self.kv.k[i], self.kv.v[i], keep) for i, layer in enumerate(self.layers)]
            table = None if None in rows else torch.tensor(rows, dtype=torch.int64)
            self._adapter_table = (version, table, keep)
        return self._adapter_table

    def __call__(self, x: torch.Tensor, meta, gate, adapters: list[int] | None = None) -> torch.Tensor:
        """x: [rows, hidden] embeddings of a decode step -> the last layer's output (not normed);
        `adapters`: each row's LoRA adapter slot (0: none), where a row has one (`takes_adapters`)."""
        tables = [t[:, 0].contiguous() for rope in self.ropes for t in rope(meta.positions)]  # cos, sin of each
        step = (*tables, meta.block_tables, meta.context_lens, meta.max_context_len)
        if adapters is not None:
            assert self.takes_adapters(gate)
            rule = gate if gate.acts_per_layer else None
            return self.layers_step(x, *step, rule, self._adapters()[1], torch.tensor(adapters, dtype=torch.int32))
        if not gate.acts_per_layer:
            return self.layers_step(x, *step)
        if isinstance(gate, RuleGate) and gate.quorum is None:  # FFN-SkipLLM's rule, run inside the native step
            return self.layers_step(x, *step, gate)
        for i in range(len(self.layers)):  # the gate picks rows per layer: one call per branch
            h = x + self.attention_branch(i, x, *step)
            x = gate(i, h, self.ffns[i])
        return x

    def _row(self, layer: int) -> int:
        return self.table.data_ptr() + layer * self.table.shape[1] * self.table.element_size()

    def attention_branch(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         cos_local: torch.Tensor, sin_local: torch.Tensor, block_tables: torch.Tensor,
                         lengths: torch.Tensor, longest: int) -> torch.Tensor:
        """The attention branch of one layer's decode step (the layer's `attention`), writing the new
        K/V; x: [rows, hidden]."""
        cfg = self.cfg
        check_decode_lengths(longest, block_tables, self.kv.block_size)
        x = x.contiguous()
        out = torch.empty_like(x)
        kernels().layer_attention_branch(
            x.data_ptr(), self._row(layer), cos.data_ptr(), sin.data_ptr(), cos_local.data_ptr(), sin_local.data_ptr(),
            block_tables.data_ptr(), lengths.data_ptr(), out.data_ptr(), x.shape[0], cfg.hidden_size, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, self.kv.block_size, block_tables.shape[1], cfg.rms_norm_eps, self.scale,
            self.softcap, cache_bits(self.kv.k), torch.get_num_threads())
        return out

    def ffn_branch(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The FFN branch of one layer (the layer's `ffn`); h: [rows, hidden], any rows."""
        cfg = self.cfg
        h = h.contiguous()
        out = torch.empty_like(h)
        kernels().layer_ffn_branch(h.data_ptr(), self._row(layer), out.data_ptr(), h.shape[0], cfg.hidden_size,
                                   self.inter, cfg.rms_norm_eps, torch.get_num_threads())
        return out

    def layers_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cos_local: torch.Tensor,
                    sin_local: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor, longest: int,
                    gate: RuleGate | None = None, table: torch.Tensor | None = None,
                    slots: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer in one call: every FFN (no gate), or FFN-SkipLLM's rule (the gate's rows, first
        and last hot layer) deciding per row and layer inside it, the gate then reporting what it
        skipped. x: [rows, hidden] fp32, updated in place and returned. `table`, `slots`: the layer
        table with the adapters' pairs and each row's slot (int32), for a step with adapter rows."""
        cfg = self.cfg
        check_decode_lengths(longest, block_tables, self.kv.block_size)
        rows = x.shape[0]
        x = x.contiguous()
        if gate is None:
            max_skips = thresholds = skipped = None
            first_hot, last_hot = 0, -1
        else:
            max_skips = torch.tensor([r.max_skips for r in gate.rows], dtype=torch.int32)
            thresholds = torch.tensor([r.threshold for r in gate.rows], dtype=torch.float32)
            skipped = torch.empty(len(self.layers), rows, dtype=torch.uint8)
            first_hot, last_hot = gate.first_hot, gate.last_hot
        table = self.table if table is None else table
        kernels().decode_layers(
            x.data_ptr(), table.data_ptr(), len(self.layers), cos.data_ptr(), sin.data_ptr(), cos_local.data_ptr(),
            sin_local.data_ptr(), block_tables.data_ptr(), lengths.data_ptr(), rows,
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.inter,
            self.kv.block_size, block_tables.shape[1], cfg.rms_norm_eps, self.scale, self.softcap,
            cache_bits(self.kv.k), torch.get_num_threads(),
            _address(max_skips), _address(thresholds), first_hot, last_hot, _address(skipped), _address(slots))
        if gate is not None:
            gate.count_with(StepSkips(skipped.bool()))
        return x


class StepSkips:
    """What a native skipping step skipped, bool [layers, rows], reported through its gate."""

    def __init__(self, skipped: torch.Tensor):
        self.skipped = skipped

    def skip_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        return self.skipped.sum(0).tolist(), self.skipped.sum(1).tolist()
