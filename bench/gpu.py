"""GPU decode benchmark, one run on any CUDA machine: the engine vs HF transformers (eager, and
static cache + torch.compile) on the same weights, against the card's bandwidth bound; dense vs a
forced FFN skip against the skipped-bytes ceiling; the CUDA backend's Triton kernels vs torch.

    python bench/gpu.py                                  # 7B-shaped Llama, random bf16 weights
    python bench/gpu.py --model smollm2-135m-instruct    # the embedded model (or a HF folder)
    python bench/gpu.py --batches 1,16 --no-compile --out bench/out
    python bench/gpu.py --shape qwen3-30b-a3b --no-hf    # a mixture of experts, random bf16 weights

Speed does not depend on weight values, so without --model a Llama-2-7B-shaped model (32 layers,
hidden 4096, FFN 11008, 32 heads) gets random bf16 weights and the embedded model's tokenizer
and vocabulary (49,152 tokens); `--shape qwen3-30b-a3b` makes a Qwen3-30B-A3B-shaped mixture of
experts instead (128 experts of 768, 8 a token; 12 of its 48 layers, 15 GB: a step's time per
layer is what it measures, and the bound is computed on the same layers). Bound = measured copy bandwidth (bytes read + written by a large
device copy, as PERF.md) / bytes of weights read per token. Times come from CUDA events or a
synchronize before the clock; medians over alternating rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import alternate  # noqa: E402
from engine.config import EngineConfig, SkipConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import cache_root, ensure_hf_dir  # noqa: E402
from engine.sampling_params import SamplingParams, SkipParams  # noqa: E402

LLAMA_7B_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
QWEN3_30B_A3B_SHAPE = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                           num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=12, num_attention_heads=32,
                           num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6)
RANDOM_SHAPES = {"llama-7b": ("LlamaConfig", "LlamaForCausalLM", LLAMA_7B_SHAPE),
                 "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", QWEN3_30B_A3B_SHAPE)}
BENCH_SKIP = SkipConfig(cold_start=4, cold_end=4, max_budget=1.0)  # the engine's skip settings here
FORCED_SKIP = dict(budget=0.25, threshold=-1.0, warmup_tokens=0)  # fires at the first hot layer, every token
NEVER_FIRES = dict(budget=0.25, threshold=1.0, warmup_tokens=0)  # the gated step; no cosine exceeds 1: nothing skipped
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")  # transformers 5 writes the chat template on its own


def skip_ceiling(bytes_per_token: float, ffn_bytes: float, realized_skip: float) -> float:
    """Speedup if time were bytes read: all weights / (all weights - the skipped FFN share)."""
    return bytes_per_token / (bytes_per_token - realized_skip * ffn_bytes)


def bound_tok_s(bandwidth_bytes_s: float, bytes_per_token: float) -> float:
    return bandwidth_bytes_s / bytes_per_token


def median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median CUDA-event time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (median_ms(lambda: dst.copy_(src), repeats=10) / 1e3)


def random_model_dir(tokenizer_dir: Path, vocab_size: int, shape: str = "llama-7b") -> Path:
    """A HF folder with a model of `shape` (RANDOM_SHAPES) of random bf16 weights and
    `tokenizer_dir`'s tokenizer: made once per machine (13.5 GB written for the 7B, about a minute)
    under the cache folder, and found there by a later run on the same machine (a warm lent GPU
    keeps its files a while)."""
    import transformers

    config_class, model_class, fields = RANDOM_SHAPES[shape]
    target = cache_root() / f"random-{shape}-vocab{vocab_size}"
    if (target / "complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"skipserve-{shape}-", dir=target.parent))
    try:
        config = getattr(transformers, config_class)(vocab_size=vocab_size, **fields)
        with torch.device("cuda"):
            model = getattr(transformers, model_class)._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(partial, safe_serialization=True)
        del model
        torch.cuda.empty_cache()
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, partial / name)
        (partial / "complete").touch()
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # a run stopped halfway leaves no 13.5 GB behind
    return target


def engine_tok_s(engine, prompt: list[int], batch: int, new_tokens: int, skip=None) -> tuple[float, float]:
    """-> (generated tok/s over the batch, realized FFN skip ratio)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate([prompt] * batch, params, skip)
    dt = time.perf_counter() - t
    skipped, total = sum(o.ffn_skipped for _, _, o in outs), sum(o.ffn_total for _, _, o in outs)
    return sum(len(ids) for _, ids, _ in outs) / dt, skipped / max(total, 1)


def hf_tok_s(model, prompt: list[int], batch: int, new_tokens: int) -> float:
    ids = torch.tensor([prompt] * batch, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return (out.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - t)


def kernel_table(model_config, batches: list[int], context: int = 1024) -> list[dict]:
    """The Triton kernels of engine/backends/cuda vs what torch does, on this model's shapes."""
    import torch.nn.functional as F

    from engine.backends.cuda.decode_attention import paged_decode_attention
    from engine.backends.cuda.masked_linear import masked_linear

    cfg, rows_out = model_config, []
    width = cfg.moe_intermediate_size or cfg.intermediate_size  # a mixture's: one expert's
    gate_up = torch.randn(2 * width, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    block_size = 16
    blocks_per_row = context // block_size
    for batch in batches:
        x = torch.randn(batch, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        none = torch.zeros(batch, dtype=torch.int32, device="cuda")
        cublas = median_ms(lambda: F.linear(x, gate_up))
        masked = median_ms(lambda: masked_linear(x, gate_up))
        skipped = median_ms(lambda: masked_linear(x, gate_up, none))
        caches = [torch.randn(batch * blocks_per_row, cfg.num_kv_heads, block_size, cfg.head_dim, device="cuda",
                              dtype=torch.bfloat16) for _ in range(2)]
        tables = torch.arange(batch * blocks_per_row, device="cuda", dtype=torch.int32).view(batch, -1)
        lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        triton_attn = median_ms(lambda: paged_decode_attention(q, *caches, tables, lens, cfg.head_dim ** -0.5))

        def gathered_sdpa():  # what a torch path does: gather the blocks, then SDPA
            keys, values = (c[tables.long()].transpose(1, 2).reshape(batch, cfg.num_kv_heads, context, cfg.head_dim)
                            for c in caches)
            return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)

        torch_attn = median_ms(gathered_sdpa)
        row = dict(batch=batch, gate_up_cublas_ms=cublas, gate_up_masked_ms=masked, gate_up_all_skipped_ms=skipped,
                   attention_triton_ms=triton_attn, attention_gather_sdpa_ms=torch_attn)
        rows_out.append(row)
        print(f"| {batch} | {cublas:.3f} | {masked:.3f} ({cublas / masked:.2f}x) | {skipped:.4f} | "
              f"{torch_attn:.3f} | {triton_attn:.3f} ({torch_attn / triton_attn:.2f}x) |")
    return rows_out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="preset name, GGUF or HF folder (default: --shape, random)")
    p.add_argument("--shape", default="llama-7b", choices=list(RANDOM_SHAPES), help="of the random model")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--hf-batches", default="1,16", help="batches HF runs at (compiling is slow)")
    p.add_argument("--skip-batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="HF eager only")
    p.add_argument("--enforce-eager", action="store_true", help="the engine's decode step without CUDA graphs")
    p.add_argument("--out", default=None, help="folder for gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device: torch.cuda.is_available() is False here; "
                         "nothing was measured")

    batches = [int(b) for b in args.batches.split(",")]
    embedded = ensure_hf_dir("")
    if args.model:
        hf_dir = ensure_hf_dir(args.model)
    else:
        from transformers import AutoTokenizer

        hf_dir = random_model_dir(embedded, len(AutoTokenizer.from_pretrained(str(embedded))), args.shape)
    run(args, hf_dir, batches)


def run(args, hf_dir, batches):
    bandwidth = copy_bandwidth()
    max_len = 256 + args.new_tokens
    # KV for exactly the largest batch, so that HF's models fit on the card beside the engine
    config = EngineConfig(model=str(hf_dir), device="cuda", dtype="bfloat16", max_num_seqs=max(batches),
                          max_model_len=max_len, kv_capacity_tokens=max(batches) * max_len, prefix_caching=False,
                          skip=BENCH_SKIP, enforce_eager=args.enforce_eager)
    engine = LLMEngine(config)
    step = engine.runner.decode_step
    decode_path = ("torch per-op path" if step is None else
                   f"Triton decode step, CUDA graphs for batches {step.graphs.captured('dense')}" if step.graphs.graphs
                   else "Triton decode step, eager")
    cfg = engine.model_config
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Write a long story about a dragon."}])
    wb = engine.runner.model.weight_bytes()
    per_token = sum(wb.values())
    bound = bound_tok_s(bandwidth, per_token)
    print(f"command: {' '.join(sys.argv)}")
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} model {hf_dir.name} "
          f"({cfg.num_layers} layers, hidden {cfg.hidden_size}) bf16, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, rounds {args.rounds}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights read per token {per_token / 1e9:.2f} GB "
          f"(FFN {wb['ffn'] / 1e9:.2f}) -> batch-1 bound {bound:.1f} tok/s")
    print(f"engine decode: {decode_path}")
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "bandwidth": bandwidth,
              "decode_path": decode_path,
              "weight_bytes": wb, "bound_tok_s": bound, "throughput": [], "skip": [], "kernels": []}

    def save():  # after each table: a run stopped by its time limit keeps what it measured
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu.json").write_text(json.dumps(report, indent=2, default=str))

    engine_tok_s(engine, prompt, 1, 16)  # warm-up

    hf_models = {}
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf_models["hf_eager"] = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16).cuda().eval()
        if not args.no_compile:
            compiled = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16).cuda().eval()
            compiled.generation_config.cache_implementation = "static"
            compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead", fullgraph=True)
            hf_models["hf_static_compile"] = compiled
    hf_batches = {int(b) for b in args.hf_batches.split(",")}

    print("\n| batch | engine tok/s | of bound (x batch) | " + " | ".join(hf_models) + " | engine / best HF |")
    print("|---:|---:|---:|" + "---:|" * len(hf_models) + "---:|")
    for batch in batches:
        engine_tok_s(engine, prompt, batch, 16)  # warm-up at this batch size
        fns = {"engine": lambda b=batch: engine_tok_s(engine, prompt, b, args.new_tokens)[0]}
        if batch in hf_batches:
            for name, model in hf_models.items():
                # warm-up: compiles for this batch size (and, static cache, for the timed length)
                warm = args.new_tokens if name == "hf_static_compile" else 8
                hf_tok_s(model, prompt, batch, warm)
                hf_tok_s(model, prompt, batch, warm)
                fns[name] = lambda m=model, b=batch: hf_tok_s(m, prompt, b, args.new_tokens)
        med = {k: statistics.median(v) for k, v in alternate(fns, args.rounds).items()}
        best_hf = max((v for k, v in med.items() if k != "engine"), default=None)
        report["throughput"].append(dict(batch=batch, **med))
        cells = " | ".join(f"{med[k]:.1f}" if k in med else "-" for k in hf_models)
        print(f"| {batch} | {med['engine']:.1f} | {med['engine'] / (bound * batch):.0%} | {cells} | "
              + (f"{med['engine'] / best_hf:.2f}x |" if best_hf else "- |"))
    del hf_models
    torch.cuda.empty_cache()
    save()

    skip, idle = SkipParams(**FORCED_SKIP), SkipParams(**NEVER_FIRES)
    print("\ndense: no row may skip (each FFN product on cuBLAS or the masked kernel, the faster at start); "
          "gated, none fires: a budget whose rule never fires (the skip gate and the masked FFN kernels, every "
          "FFN computed); forced skip: fires at the first hot layer")
    print("| batch | dense tok/s | gated, none fires | forced skip tok/s | realized skip | speedup | ceiling | "
          "gain / ceiling gain |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.skip_batches.split(",")):
        realized = []

        def skipping(b=batch):
            tok_s, ratio = engine_tok_s(engine, prompt, b, args.new_tokens, skip)
            realized.append(ratio)
            return tok_s

        for variant in (None, idle, skip):  # warm-up: each variant's kernels at this batch size
            engine_tok_s(engine, prompt, batch, 16, variant)
        res = alternate({"dense": lambda b=batch: engine_tok_s(engine, prompt, b, args.new_tokens)[0],
                         "gated": lambda b=batch: engine_tok_s(engine, prompt, b, args.new_tokens, idle)[0],
                         "skip": skipping}, args.rounds)
        dense, gated, skipped = (statistics.median(res[k]) for k in ("dense", "gated", "skip"))
        ratio = statistics.median(realized)
        ceiling = skip_ceiling(per_token, wb["ffn"], ratio)
        speedup = skipped / dense
        report["skip"].append(dict(batch=batch, dense=dense, gated_none_fires=gated, skip=skipped, realized=ratio,
                                   ceiling=ceiling))
        share = f"{(speedup - 1) / (ceiling - 1):.2f}" if ceiling > 1 else "- (nothing skipped)"
        print(f"| {batch} | {dense:.1f} | {gated:.1f} | {skipped:.1f} | {ratio:.3f} | {speedup:.3f}x | "
              f"{ceiling:.3f}x | {share} |")
        save()

    if step is not None and step.tuning:
        print("\nmasked linear tiles measured at start (tile_tuning.py; us, Triton do_bench median, L2 flushed):")
        print("| weight | row tile | tiles (N x K, warps, stages) | tuned | default tiles | cuBLAS | dense steps run |")
        print("|---|---:|---|---:|---:|---:|---|")
        for r in step.tuning:
            t = r["tiles"]
            default = "-" if r["default_ms"] is None else f"{r['default_ms'] * 1e3:.1f}"
            print(f"| {'x'.join(map(str, r['shape']))} | {r['rows']} | {t.block_n}x{t.block_k}, {t.num_warps}, "
                  f"{t.num_stages} | {r['ms'] * 1e3:.1f} | {default} | {r['cublas_ms'] * 1e3:.1f} | "
                  f"{'cuBLAS' if r['cublas_ms'] <= r['ms'] else 'masked kernel'} |")
        report["tiles"] = [dict(r, tiles=dataclasses.asdict(r["tiles"])) for r in step.tuning]
    print("\nkernels on this model's shapes (ms, CUDA events, median of 20; attention over 1,024 tokens):")
    print("| batch | gate_up cuBLAS | gate_up masked Triton | masked, no row runs | attention gather+SDPA | "
          "attention paged Triton |")
    print("|---:|---:|---:|---:|---:|---:|")
    report["kernels"] = kernel_table(cfg, batches)
    save()


if __name__ == "__main__":
    main()
