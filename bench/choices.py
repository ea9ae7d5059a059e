"""A request with n choices on a new prompt, against one choice: wall time and prompt tokens
computed, in-process on the embedded model (one token a choice, temperature 1). Run it from
another tree's root to measure that tree's engine (the engine is imported from the working
directory).

    .venv/bin/python bench/choices.py --n 4
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "engine" / "data" / "calibration.txt"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--words", type=int, default=900, help="prompt length, in words of engine/data/calibration.txt")
    args = ap.parse_args()
    engine = LLMEngine(load_config(preset_path("smollm2-135m-instruct")))
    prompt = engine.tokenizer.encode(" ".join(TEXT.read_text().split()[:args.words]))
    for n in (1, args.n):
        computed = engine.prompt_tokens_total
        t = time.perf_counter()
        engine.add_request(f"n{n}", [n] + prompt, SamplingParams(n=n, temperature=1.0, max_tokens=1))  # a new prompt
        while engine.has_work:
            engine.step()
        print(f"n = {n}: {time.perf_counter() - t:.2f} s, {engine.prompt_tokens_total - computed} prompt tokens "
              f"computed (prompt {len(prompt) + 1} tokens)")


if __name__ == "__main__":
    main()
