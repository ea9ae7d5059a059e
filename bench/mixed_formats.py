"""Decode speed of a GGUF whose projections mix quantized layouts within one matrix product, as
llama.cpp's Q4_K_M files do (q and k in Q4_K, v in Q6_K on some layers): the native decode step,
which runs such a projection as parts, against the per-op path, which is where such a file ran
before (any mixed projection took the whole model off the native step). Side by side in one
process, alternating rounds, medians; aggregate tok/s of whole requests (bench/decode.py's
`engine_run`: a chat prompt of ~30 tokens prefilled, then the new tokens).

The file: the embedded SmolLM2 GGUF (Q4_1) with attn_v of every other layer requantized to Q8_0
(dequantized, then gguf-py's Q8_0), everything else copied as it is.

    .venv/bin/python bench/mixed_formats.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import embedded_gguf  # noqa: E402
from bench.decode import engine_run  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to bake bread."


def write_mixed(source: Path, target: Path) -> int:
    """Copy `source` with attn_v of odd layers in Q8_0 -> the number of tensors requantized."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    changed = 0
    for tensor in reader.tensors:
        data, kind = np.asarray(tensor.data), tensor.tensor_type
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) % 2 == 1 and parts[2] == "attn_v":
            data, kind = quantize(dequantize(data, kind), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
            changed += 1
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return changed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", default="1,16")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smollm2-mixed.gguf"
        changed = write_mixed(embedded_gguf("smollm2-135m-instruct"), path)
        engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="auto", max_num_seqs=16,
                                        max_model_len=1024, prefix_caching=False, cache_dir=tmp))
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
        model = engine.runner.model
        native = model.fused_decode
        mixed = sum(hasattr(layer.qkv, "parts") for layer in model.layers)
        print(f"{' '.join(sys.argv)}\nSmolLM2-135M GGUF, attn_v of {changed} layers in Q8_0 (q|k|v in parts on "
              f"{mixed} of {len(model.layers)} layers), formats {model.weight_formats()}, device cpu, threads "
              f"{torch.get_num_threads()}, {args.new_tokens} new tokens, {args.rounds} rounds, dense (skip 0)")
        if native is None:
            sys.exit("the native decode step does not run here (no native kernels for these weights on this CPU)")
        print("| batch | per-op path tok/s (median) | native step tok/s (median) | native / per-op |")
        print("|---:|---:|---:|---:|")
        for batch in map(int, args.batches.split(",")):
            res = {"per-op": [], "native": []}
            for name, step in (("per-op", None), ("native", native)):  # warm-up
                model.fused_decode = step
                engine_run(engine, prompt, batch, 8)
            for r in range(args.rounds):
                order = [("per-op", None), ("native", native)]
                for name, step in order if r % 2 == 0 else order[::-1]:
                    model.fused_decode = step
                    res[name].append(engine_run(engine, prompt, batch, args.new_tokens)[0])
            model.fused_decode = native
            ratio = statistics.median([a / b for a, b in zip(res["native"], res["per-op"])])
            print(f"| {batch} | {statistics.median(res['per-op']):.1f} | {statistics.median(res['native']):.1f} | "
                  f"{ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
