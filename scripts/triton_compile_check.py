"""Compile the CUDA decode step's Triton kernels for a GPU on a machine without one.

    python scripts/triton_compile_check.py                 # SmolLM2, Llama-2-7B, Llama-3-8B shapes; sm_90, 80, 89; bf16, fp32
    python scripts/triton_compile_check.py --arch 90 --rows 1,64

Triton's interpreter (the CPU tests) runs a kernel's Python, not its compiler: a kernel may pass
every interpreted test and still fail to compile for a GPU, or ask for more shared memory than
the GPU has and fail at launch. This runs the real decode step (engine/backends/cuda/decode_step.py)
on CPU tensors of a model's shapes (two layers, zero weights) with launches replaced by
compilations for the target (Triton's NVIDIA backend and its bundled ptxas, as the pip wheel ships
them), as the step would on that GPU: tiles and dot operands as for CUDA tensors. It reports each
kernel's specialisations with their shared memory against the architecture's per-block limit, and
registers and spilled (local) bytes per thread; also every tiling of the masked linear that a GPU
times at start (tile_tuning.py): one over the limit is passed over there, not a failure.
Outputs of the uncompiled launches are whatever memory held, and the step's cuBLAS products
are not computed (only their shapes matter here): nothing here checks values (the interpreted
tests do).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# before anything defines a kernel: @triton.jit reads it then, and interpreted kernels compile nothing
os.environ.pop("TRITON_INTERPRET", None)

# per-block shared memory a kernel may opt into (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     head_dim=128, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, vocab_size=1024),  # the vocabulary only sizes the embedding: kept small
    # Gemma 3 1B: the widest head any served model has (256), per-head q/k norms, a sliding
    # layer on its own rotary table then a global one, the attention's and FFN's outputs normed,
    # GELU-tanh
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, vocab_size=1024, sliding_window=512,
                      layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=256,
                      rope_local_base_freq=10000.0),
    # Gemma 2 2B: scores soft-capped (the attention's HAS_SOFTCAP branch), no head norms
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, vocab_size=1024, sliding_window=4096,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # Qwen3 0.6B: per-head q/k norms in the step, heads wider than hidden / heads
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=1024),
    # Phi-4-mini: the leading 96 of each head's 128 dimensions rotated (the rotary kernel's partial branch)
    "phi4-mini": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
                      head_dim=128, partial_rotary_factor=0.75, vocab_size=1024),
    # mixtures of experts: the routed expert kernels. As many experts as a token chooses (the
    # kernels' code does not depend on the count; the real 128 and 32 would only take memory here)
    # Qwen3-30B-A3B: 8 of 128 experts a token, 768 wide
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=8, num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=1024),
    # gpt-oss-20b: 4 of 32 experts, the clamped SwiGLU, biases, sinks, 128-token windows on every other layer
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_local_experts=4,
                        num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        sliding_window=128, vocab_size=1024),
}


@contextlib.contextmanager
def compiling_for(arch: int):
    """Within: every Triton launch compiles for sm_`arch` (warp size 32) and launches nothing;
    yields the list of (kernel name, compiled kernel) it fills. Kernel wrappers pick their
    CUDA configuration (engine/backends/cuda/kernel_support.interpreted answers False)."""
    assert "TRITON_INTERPRET" not in os.environ, "kernels defined under the interpreter do not compile"
    import triton  # noqa: F401
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from engine.backends.cuda import kernel_support

    class CompileOnlyDriver:
        def get_current_device(self):  # a device of its own per architecture: Triton keeps a kernel's
            return arch                 # target, and what it compiled, per device

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    compiled, run, interpreted = [], JITFunction.run, kernel_support.interpreted

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    def shaped_linear(x, weight, bias=None):  # the cuBLAS products on the CPU: their shapes, not their values
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    driver.set_active(CompileOnlyDriver())
    JITFunction.run, kernel_support.interpreted = compile_only, lambda tensor: False
    try:
        with mock.patch("torch.nn.functional.linear", shaped_linear), \
                mock.patch("torch.Tensor.addmm_", lambda self, *args, **kwargs: self):
            yield compiled
    finally:
        JITFunction.run, kernel_support.interpreted = run, interpreted
        with contextlib.suppress(RuntimeError):  # no GPU driver to go back to
            driver.reset_active()


def resources(cubin: bytes) -> dict:
    """Registers and local memory (spills) per thread from `cuobjdump --dump-resource-usage`,
    which triton's wheel ships beside ptxas; {} where it is missing."""
    import triton

    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":", 1) for line in report.splitlines() if "REG:" in line for item in line.split())
    return {"registers": int(fields["REG"]), "local": int(fields["LOCAL"])} if fields else {}


def two_layer_model(shape: dict, max_len: int, dtype):
    """A Llama (or the shape's `model_type`: Qwen3, Gemma 2 or 3, Qwen3-MoE, gpt-oss) of `shape`
    with two layers of zero weights and activations in `dtype`, on the CPU."""
    import torch

    from engine.backends.torch_backend import TorchBackend
    from engine.config import ModelConfig
    from engine.models import build_model

    config = dict(num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, eos_token_id=2, **{"model_type": "llama", **shape})
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        cfg = ModelConfig.from_hf_dir(folder)
    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    state = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (cfg.num_heads * d, h), p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
                  p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h), p + "self_attn.o_proj.weight": (h, cfg.num_heads * d)}
        if cfg.num_experts:
            width, gpt_oss = cfg.moe_intermediate_size or inter, cfg.model_type == "gpt_oss"
            router = "mlp.router" if gpt_oss else "mlp.gate"
            state[f"{p}{router}.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                state |= {f"{p}mlp.experts.{e}.{part}_proj.weight": size
                          for part, size in (("gate", (width, h)), ("up", (width, h)), ("down", (h, width)))}
            if gpt_oss:  # biases everywhere, a sink per head
                state |= {f"{p}{router}.bias": (cfg.num_experts,), p + "self_attn.sinks": (cfg.num_heads,)}
                state |= {f"{p}self_attn.{part}_proj.bias": (size,) for part, size in
                          (("q", cfg.num_heads * d), ("k", cfg.num_kv_heads * d), ("v", cfg.num_kv_heads * d), ("o", h))}
                for e in range(cfg.num_experts):
                    state |= {f"{p}mlp.experts.{e}.{part}_proj.bias": (size,)
                              for part, size in (("gate", width), ("up", width), ("down", h))}
        else:
            state |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                      p + "mlp.down_proj.weight": (h, inter)}
        if cfg.model_type in ("qwen3", "gemma3_text", "qwen3_moe"):
            state |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if cfg.model_type in ("gemma2", "gemma3_text"):
            state |= {p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
    state = {name: torch.zeros(size, dtype=dtype) for name, size in state.items()}
    # activations in the weights' dtype, as on a GPU (the CPU keeps them in fp32)
    with mock.patch("engine.models.llama.activation_dtype", lambda device, dtype: dtype):
        return build_model(cfg, state, "cpu", dtype, max_len, TorchBackend())


CONTEXT = 4096  # tokens a row holds: long enough for the attention's splits


def compile_decode_step(model, arch: int, rows: list[int], context: int = CONTEXT, block_size: int = 16,
                        candidates: bool = True) -> list[dict]:
    """The kernels one decode step of `model` (two_layer_model's, for at least `context`
    positions) compiles to on sm_`arch`, for each batch in `rows` at `context` tokens, and the
    attention with a sliding window and the K/V write of the eager path (the decode of models the
    step does not take); with `candidates`, every masked linear tiling the GPU may tune to -> one
    dict per specialisation."""
    import torch

    from engine.backends.cuda.decode_attention import paged_decode_attention
    from engine.backends.cuda.decode_step import DecodeStep
    from engine.backends.cuda.graphs import DecodeInputs
    from engine.backends.cuda.masked_ffn import MaskedFFN
    from engine.backends.cuda.masked_linear import CANDIDATES, masked_linear
    from engine.backends.cuda.write_kv import write_kv
    from engine.config import SkipConfig
    from engine.kv.cache import KVCache

    dtype = model.act_dtype
    cfg, blocks_per_row = model.cfg, -(-context // block_size)
    kv = KVCache(cfg.num_layers, blocks_per_row, cfg.num_kv_heads, block_size, cfg.head_dim, "cpu", dtype)
    # cold layers 0 and 0: both layers run the gate, and a rule that may skip them: per row, and
    # batch-aligned (quorum 0.5)
    steps = [DecodeStep(model, kv, max(rows), blocks_per_row, SkipConfig(cold_start=0, cold_end=0), quorum)
             for quorum in (None, 0.5)]
    step, table, seen = steps[0], list(range(blocks_per_row)), {}
    with compiling_for(arch) as compiled, torch.inference_mode():
        for n in rows:
            inputs = DecodeInputs([1] * n, [context - 1] * n, [table] * n, [1] * n, [0.5] * n)
            batch = step.buffers.fill(inputs, n)
            step.forward(batch, gated=False)  # the FFN's products on cuBLAS, then on the masked kernels with
            with mock.patch("engine.backends.cuda.decode_step.prefer_masked", lambda *args: True):  # no row mask,
                step.forward(batch, gated=False)  # as where those ran faster at start
            for rule in steps:
                rule.forward(rule.buffers.fill(inputs, n), gated=True)
            q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dtype)
            paged_decode_attention(q, kv.k[0], kv.v[0], batch.block_tables, batch.context_lens, 0.1, window=512)
            k = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
            write_kv(k, k, kv.k[0], kv.v[0], batch.slots)  # the eager path's K/V write
        labels = [name for name, _ in compiled]
        ffn = step.ffns[0]
        for n in rows if candidates and isinstance(ffn, MaskedFFN) else []:  # the tiles a GPU tunes among at start (tile_tuning.py), on the FFN's shapes
            x, run = torch.zeros(n, cfg.hidden_size, dtype=dtype), torch.ones(n, dtype=torch.int32)
            gate_up = torch.zeros(n, 2 * cfg.intermediate_size, dtype=dtype)
            for t in CANDIDATES:
                masked_linear(x, ffn.gate_up_weight, run, tiles=t)
                masked_linear(gate_up, ffn.down_weight, run, residual=None if ffn.out_norm_weight is not None else x,
                              tiles=t, activation=ffn.activation)
                labels += [f"{name} (tuning candidate {t.block_n}x{t.block_k})" for name, _ in compiled[len(labels):]]
    if not compiled:
        raise RuntimeError("no kernel compiled: were they defined under TRITON_INTERPRET=1?")
    limit = SHARED_LIMIT.get(arch)
    for label, (name, kernel) in zip(labels, compiled):
        key = (name, kernel.hash)
        if key not in seen:
            meta = kernel.metadata
            seen[key] = {"kernel": label, "arch": arch, "dtype": str(dtype).removeprefix("torch."), "shared": meta.shared,
                         "num_warps": meta.num_warps, "num_stages": meta.num_stages, "limit": limit,
                         "fits": limit is None or meta.shared <= limit, "candidate": label != name,
                         **resources(kernel.asm["cubin"])}
    return list(seen.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m,llama-7b,llama3-8b", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--arch", default="90,80,89", help="compute capabilities: 90 (H100/H200), 80 (A100), 89 (L4, RTX 4090)")
    p.add_argument("--rows", default="1,16,64", help="decode batch sizes")
    p.add_argument("--dtype", default="bfloat16,float32", help="weights and activations (CUDA serves bf16 by default)")
    p.add_argument("--tuning-candidates", action=argparse.BooleanOptionalAction, default=True,
                   help="also every masked linear tiling a GPU times at start")
    args = p.parse_args()
    failed = 0
    print("| shape | dtype | kernel | sm | shared bytes | limit | warps | stages | registers | spilled bytes |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    import torch

    for shape in args.shape.split(","):
        for dtype in args.dtype.split(","):
            model = two_layer_model(SHAPES[shape], CONTEXT, getattr(torch, dtype))  # the same for each architecture
            for arch in map(int, args.arch.split(",")):
                for r in compile_decode_step(model, arch, [int(x) for x in args.rows.split(",")],
                                             candidates=args.tuning_candidates):
                    failed += not r["fits"] and not r["candidate"]
                    verdict = ("" if r["fits"] else " over the limit: passed over when tuning" if r["candidate"]
                               else " **over the limit**")
                    print(f"| {shape} | {dtype} | {r['kernel']} | "
                          f"{arch} | {r['shared']} | {r['limit']} | {r['num_warps']} | {r['num_stages']} | "
                          f"{r.get('registers', '-')} | {r.get('local', '-')} |{verdict}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
