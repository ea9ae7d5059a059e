"""Cost of structured outputs inside real decode steps: the embedded model (as served; `--model`
for another preset) decodes batches of rows that sample freely, then rows held to `response_format`
json_object, to a JSON schema, and to that schema with its strings and numbers held to patterns,
formats, lengths and bounds ("held values"), rounds alternating; per step, the whole step's time and the time
spent making token masks.
A round with a schema starts with an empty mask cache ("cold": every state's mask is walked over
the vocabulary when first met) unless `--warm`; the later steps of a round reuse masks of states met
before. The vocabulary's index (built once; the server builds it beside its step loop at load) is timed apart. Constrained
rows stop when their JSON ends, so their batches thin out: compare the masks' share of a step, not
step times across settings.

    .venv/bin/python bench/structured.py --out bench/out
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Describe three fictional people: their names, ages, hobbies and pets."
PERSON = {
    "type": "object",
    "properties": {
        "people": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                           "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                           "pet": {"anyOf": [{"enum": ["cat", "dog", "fish"]}, {"type": "null"}]}},
            "required": ["name", "age", "hobbies", "pet"], "additionalProperties": False}},
    },
    "required": ["people"], "additionalProperties": False,
}
# the same people, their strings and numbers held to patterns, formats, lengths and bounds (each
# character of such a string is a state of its own: its masks are walked over the whole vocabulary)
HELD = {
    "type": "object",
    "properties": {
        "people": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+( [A-Z][a-z]+)?$", "maxLength": 24},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                           "born": {"type": "string", "format": "date"},
                           "hobbies": {"type": "array", "maxItems": 3,
                                       "items": {"type": "string", "minLength": 3, "maxLength": 30}},
                           "pet": {"anyOf": [{"enum": ["cat", "dog", "fish"]}, {"type": "null"}]}},
            "required": ["name", "age", "born", "hobbies", "pet"], "additionalProperties": False}},
    },
    "required": ["people"], "additionalProperties": False,
}
SETTINGS = {"free text": None, "json_object": {"type": "object"}, "json_schema": PERSON, "held values": HELD}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a preset (server/presets)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting, alternating; medians")
    ap.add_argument("--warm", action="store_true", help="keep the mask cache from round to round")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from bench.report import write_report
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from engine.structured.constraint import Constraint
    from server.config_file import load_config, preset_path

    batches = [int(b) for b in args.batches.split(",")]
    config = load_config(preset_path(args.model))
    config.max_num_seqs, config.max_model_len = max(batches), 1024
    engine = LLMEngine(config)
    t = time.perf_counter()
    engine.structured.vocabulary  # noqa: B018 (built here, timed)
    index_s = time.perf_counter() - t
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    spent = []
    mask = Constraint.mask

    def timed_mask(self):
        t = time.perf_counter()
        out = mask(self)
        spent.append(time.perf_counter() - t)
        return out

    Constraint.mask = timed_mask

    def run(batch: int, schema, seed: int) -> tuple[float, float, float]:
        if schema is not None and not args.warm:
            engine.structured.clear_masks()
        params = [SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=seed + i, ignore_eos=True,
                                 response_schema=schema) for i in range(batch)]
        for i, p in enumerate(params):
            engine.add_request(f"{batch}-{seed}-{i}", prompt, p)
        start = engine.generation_tokens_total
        while engine.generation_tokens_total - start < batch:  # the prefill, until every row has its first token
            engine.step()
        steps, masks, tokens = [], [], engine.generation_tokens_total
        while engine.has_work:
            spent.clear()
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
            masks.append(sum(spent))
        if not steps:  # every row's document ended with its first token (`{}`)
            return None
        made = engine.generation_tokens_total - tokens
        return statistics.median(steps) * 1e3, statistics.mean(masks) * 1e3, made / len(steps)

    results = {b: {name: [] for name in SETTINGS} for b in batches}
    for b in batches:
        run(b, PERSON, 0)  # warm-up
        for r in range(args.rounds):
            for name, schema in SETTINGS.items():
                results[b][name].append(run(b, schema, 100 * r))
    lines = [f"command: bench/structured.py {' '.join(sys.argv[1:])}", f"model {args.model}",
             f"vocabulary index for {engine.tokenizer.vocab_size} tokens built in {index_s:.2f} s (once; the server "
             f"builds it beside its step loop at load); mask cache {'kept across rounds' if args.warm else 'empty at each round'}",
             "", "| batch | setting | step ms (median) | masks ms / step (mean) | masks / step | rows a step (mean) |",
             "|---:|---|---:|---:|---:|---:|"]
    for b in batches:
        for name in SETTINGS:
            runs = [x for x in results[b][name] if x is not None]
            if not runs:
                lines.append(f"| {b} | {name} | - | - | - | every answer was `{{}}` |")
                continue
            step, masks, rows = (statistics.median(x[i] for x in runs) for i in range(3))
            lines.append(f"| {b} | {name} | {step:.2f} | {masks:.2f} | {masks / step:.0%} | {rows:.1f} |")
    write_report(args.out, "structured", lines, results)


if __name__ == "__main__":
    main()
