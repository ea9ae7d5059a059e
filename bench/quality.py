"""Quality of FFN skipping on the embedded model, next to the realized skip ratio.

For each budget: teacher-forced top-1 agreement with dense and NLL/perplexity delta on held-out
text (positions after the warm-up), greedy-generation agreement with dense on chat prompts, and
accuracy on a small factoid QA set. Writes a markdown table and a plot. When the preset serves a
GGUF in its own quantization, first the same measures for that quantization (dense) against the
same file dequantized to fp32.

    .venv/bin/python bench/quality.py --out bench/out
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams, SkipParams  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402

DATA = ROOT / "bench" / "data"


def held_out(tok) -> tuple[list[list[int]], list[list[int]]]:
    """The held-out texts (teacher-forced) and chat prompts (greedy) as token ids."""
    texts = [tok.encode(t) for t in (DATA / "heldout.txt").read_text().splitlines() if t.strip()]
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in json.loads((DATA / "prompts.json").read_text())]
    return texts, prompts


@torch.inference_mode()
def teacher_forced(engine: LLMEngine, texts: list[list[int]], skip: SkipParams, prefix: int = 8):
    """Feed each text token by token as decode steps (all texts in one batch) through the skip gate.

    -> (argmax [steps, rows], nll [steps, rows], skipped FFN blocks, total FFN blocks), counted over
    the positions after the warm-up."""
    runner, policy = engine.runner, engine.runner.policy
    plan = engine.resolve_skip(skip)
    length = min(len(t) for t in texts)
    texts = [t[:length] for t in texts]
    ids = torch.tensor(texts, device=runner.device)
    rows = len(texts)
    with engine.kv_blocks([length] * rows) as tables:
        runner.prefill([(text[:prefix - 1], table, 0) for text, table in zip(texts, tables)])
        argmax, nll, skipped, total = [], [], 0, 0
        for step, pos in enumerate(range(prefix - 1, length - 1)):
            gate = policy.make_gate([policy.row_skip(plan, step)] * rows, runner.device)
            logits = runner.logits(runner.decode([t[pos] for t in texts], [pos] * rows, tables, gate))
            if step < plan.warmup_tokens:
                continue
            per_row, _ = gate.skip_counts(rows)
            skipped += sum(per_row)
            total += runner.num_layers * rows
            argmax.append(logits.argmax(-1))
            nll.append(-torch.log_softmax(logits, -1).gather(1, ids[:, pos + 1:pos + 2])[:, 0])
        return torch.stack(argmax), torch.stack(nll), skipped, total


def greedy(engine, prompts, skip, max_tokens):
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), skip)
    return [ids for _, ids, _ in outs], [text for text, _, _ in outs], outs


def side_by_side(reference: LLMEngine, other: LLMEngine, texts: list[list[int]], prompts: list[list[int]],
                 gen_tokens: int) -> dict:
    """Two builds of one model, dense: `other`'s teacher-forced top-1 agreement with `reference` and
    both NLLs on `texts`, and the share of greedy tokens before their answers to `prompts` part."""
    dense = SkipParams(budget=0.0)
    ref_top1, ref_nll, *_ = teacher_forced(reference, texts, dense)
    top1, nll, *_ = teacher_forced(other, texts, dense)
    a, b = greedy(reference, prompts, dense, gen_tokens)[0], greedy(other, prompts, dense, gen_tokens)[0]
    prefix = sum(next((i for i, (x, y) in enumerate(zip(g, h)) if x != y), min(len(g), len(h))) for g, h in zip(a, b))
    return {"top1_agreement": float((ref_top1 == top1).float().mean()), "nll_reference": float(ref_nll.mean()),
            "nll_other": float(nll.mean()),
            "greedy_prefix_agreement": prefix / sum(min(len(g), len(h)) for g, h in zip(a, b))}


def evaluate(engine: LLMEngine, budgets: list[float], gen_tokens: int) -> list[dict]:
    tok = engine.tokenizer
    texts, prompts = held_out(tok)
    qa = json.loads((DATA / "factoid_qa.json").read_text())
    qa_prompts = [tok.encode_chat([{"role": "user", "content": f"Answer in one or two words. {x['q']}"}]) for x in qa]

    dense_arg, dense_nll, _, _ = teacher_forced(engine, texts, SkipParams(budget=0.0))
    dense_gen, _, _ = greedy(engine, prompts, SkipParams(budget=0.0), gen_tokens)
    rows = []
    for budget in budgets:
        t0 = time.perf_counter()
        skip = SkipParams(budget=budget)
        arg, nll, skipped, total = teacher_forced(engine, texts, skip)
        gen, _, outs = greedy(engine, prompts, skip, gen_tokens)
        same = sum(a == b for g, d in zip(gen, dense_gen) for a, b in zip(g, d))
        positions = sum(min(len(g), len(d)) for g, d in zip(gen, dense_gen))
        prefix_match = sum(next((i for i, (a, b) in enumerate(zip(g, d)) if a != b), min(len(g), len(d)))
                           for g, d in zip(gen, dense_gen)) / positions
        _, answers, qa_outs = greedy(engine, qa_prompts, skip, 12)
        correct = sum(any(a in ans.lower() for a in x["a"]) for x, ans in zip(qa, answers))
        gen_skipped = sum(o.ffn_skipped for _, _, o in outs)
        gen_total = sum(o.ffn_total for _, _, o in outs)
        rows.append({
            "budget": budget,
            "tf_skip_ratio": skipped / total if total else 0.0,
            "gen_skip_ratio": gen_skipped / gen_total if gen_total else 0.0,
            "top1_agreement": float((arg == dense_arg).float().mean()),
            "nll": float(nll.mean()), "nll_delta": float(nll.mean() - dense_nll.mean()),
            "ppl": math.exp(float(nll.mean())),
            "greedy_token_agreement": same / positions, "greedy_prefix_agreement": prefix_match,
            "qa_accuracy": correct / len(qa), "seconds": time.perf_counter() - t0,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def quantization_vs_fp32(served: LLMEngine, fp32: LLMEngine, gen_tokens: int) -> dict:
    """The served quantized weights (and their KV cache dtype) against the same file dequantized to
    fp32, both dense."""
    tok = served.tokenizer
    texts, prompts = held_out(tok)
    dense = SkipParams(budget=0.0)
    (arg_q, nll_q, _, _), (arg_f, nll_f, _, _) = (teacher_forced(e, texts, dense) for e in (served, fp32))
    gen_q, gen_f = (greedy(e, prompts, dense, gen_tokens)[0] for e in (served, fp32))
    same = sum(a == b for g, d in zip(gen_q, gen_f) for a, b in zip(g, d))
    return {"top1_agreement": float((arg_q == arg_f).float().mean()), "positions": arg_q.numel(),
            "nll_fp32": float(nll_f.mean()), "nll_delta": float(nll_q.mean() - nll_f.mean()),
            "greedy_token_agreement": same / sum(min(len(g), len(d)) for g, d in zip(gen_q, gen_f)),
            "kv_dtypes": [str(e.runner.kv_dtype).removeprefix("torch.") for e in (served, fp32)],
            "weight_mb_per_token": sum(served.runner.model.weight_bytes().values()) / 1e6,
            "fp32_weight_mb_per_token": sum(fp32.runner.model.weight_bytes().values()) / 1e6}


def markdown(rows, header: str) -> str:
    lines = [header, "",
             "| budget | realized skip (gen) | realized skip (TF) | top-1 agree (TF) | NLL delta | perplexity | "
             "greedy token agree | greedy prefix agree | QA accuracy |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['budget']:.2f} | {r['gen_skip_ratio']:.3f} | {r['tf_skip_ratio']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['nll_delta']:+.3f} | {r['ppl']:.2f} | "
                     f"{r['greedy_token_agreement']:.3f} | {r['greedy_prefix_agreement']:.3f} | {r['qa_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, title: str) -> None:
    """Agreement, accuracy and realized skip ratios against the requested budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["budget"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for key, label in [("top1_agreement", "teacher-forced top-1 agreement with dense"),
                       ("greedy_prefix_agreement", "greedy generation: share of tokens before divergence"),
                       ("qa_accuracy", "factoid QA accuracy")]:
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    for key, label in [("tf_skip_ratio", "realized skip ratio, teacher-forced (after warm-up)"),
                       ("gen_skip_ratio", "realized skip ratio, generation (incl. warm-up)")]:
        ax.plot(x, [r[key] for r in rows], marker="s", linestyle="--", color="grey" if "tf" in key else "black",
                label=label)
    ax.set_xlabel("requested budget (ffn_skip.budget)")
    ax.set_ylabel("agreement / accuracy / skip ratio")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m-instruct")
    p.add_argument("--budgets", default="0,0.1,0.25,0.4")
    p.add_argument("--threshold", type=float)
    p.add_argument("--policy", choices=["ffn_skipllm", "batch_aligned"],
                   help="skip policy (default: the preset's); batch_aligned decides across the rows of a step")
    p.add_argument("--cold-start", type=int)
    p.add_argument("--cold-end", type=int)
    p.add_argument("--warmup-tokens", type=int)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--replot", action="store_true", help="redraw quality.png from OUT/quality.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / "quality.json").read_text())
        plot(saved["rows"], out / "quality.png", saved.get("title", f"FFN skipping on {args.preset}"))
        return
    config = load_config(preset_path(args.preset))
    over = {k: v for k, v in [("policy", args.policy), ("threshold", args.threshold),
                               ("cold_start", args.cold_start), ("cold_end", args.cold_end),
                               ("warmup_tokens", args.warmup_tokens)] if v is not None}
    config.skip = replace(config.skip, max_budget=1.0, **over)
    config.max_num_seqs, config.max_model_len = 32, 512
    engine = LLMEngine(config)
    s = config.skip
    weights = "GGUF-quantized" if engine.runner.quantized else engine.runner.dtype
    header = (f"`{' '.join(sys.argv)}` — {args.preset}, {weights} weights, {engine.runner.device}, "
              f"threads={torch.get_num_threads()}; policy {s.policy}, threshold {s.threshold}, cold "
              f"{s.cold_start}/{s.cold_end}, warm-up {s.warmup_tokens}")
    quant = None
    if engine.runner.quantized:
        fp32_config = replace(config, dtype="float32")
        quant = quantization_vs_fp32(engine, LLMEngine(fp32_config), args.gen_tokens)
        print(json.dumps({"quantization_vs_fp32": quant}), flush=True)
    rows = evaluate(engine, [float(b) for b in args.budgets.split(",")], args.gen_tokens)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, header)
    if quant:
        md = (f"Served GGUF quantization ({', '.join(engine.runner.model.weight_formats())}, {quant['kv_dtypes'][0]} "
              f"KV cache) vs the same file dequantized to fp32 ({quant['kv_dtypes'][1]} KV cache), both dense: "
              f"teacher-forced top-1 agreement {quant['top1_agreement']:.4f} over "
              f"{quant['positions']} positions, NLL delta {quant['nll_delta']:+.4f} (fp32 NLL {quant['nll_fp32']:.3f}), "
              f"greedy token agreement {quant['greedy_token_agreement']:.3f}; weights read per token "
              f"{quant['weight_mb_per_token']:.0f} MB vs {quant['fp32_weight_mb_per_token']:.0f} MB.\n\n" + md)
    title = f"FFN skipping on {args.preset} (threshold {s.threshold}, cold {s.cold_start}/{s.cold_end})"
    (out / "quality.md").write_text(md)
    (out / "quality.json").write_text(json.dumps({"config": vars(args), "title": title, "rows": rows,
                                                        "quantization_vs_fp32": quant}, indent=1))
    plot(rows, out / "quality.png", title)
    print(md)


if __name__ == "__main__":
    main()
