"""What the benchmarks of random-weight GGUFs (bench/dense_cpu.py, bench/moe_cpu.py) share: the
embedded model's tokenizer copied into the file they write, a prompt of its own for each row, and
the engine loaded with the bytes a token reads and the read bandwidth measured beside them."""
from __future__ import annotations

import time
from dataclasses import dataclass

from bench.bandwidth import read_bandwidth_gbs
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SkipParams

# a batch's rows get different prompts: rows decoding the same text would choose the same experts
PROMPTS = [f"Write a long story about {who} who learns to {what}." for who, what in (
    ("a dragon", "bake bread"), ("an old sailor", "paint"), ("a robot", "dance the tango"), ("two foxes", "play chess"),
    ("a lighthouse keeper", "grow tomatoes"), ("a young witch", "fix bicycles"), ("a snail", "win a race"),
    ("a librarian", "climb mountains"))]


def copy_tokenizer(source, writer) -> None:
    """Every `tokenizer.*` field of the GGUFReader `source` into the GGUFWriter `writer`."""
    from gguf import GGUFValueType

    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            if field.types[0] == GGUFValueType.ARRAY:
                writer.add_array(key, field.contents())
            else:
                writer.add_key_value(key, field.contents(), field.types[0])


def forced_skip(budget: float) -> SkipParams:
    """A skip that fires at the first hot layer, from the first token, up to `budget`."""
    return SkipParams(budget=budget, threshold=-1.0, warmup_tokens=0)


@dataclass
class Loaded:
    engine: LLMEngine
    load_s: float
    prompts: list[list[int]]  # PROMPTS as chat prompts, token ids
    per_token: dict[str, int]  # weight bytes a token reads, by part (ffn, attention, lm_head)
    bandwidth: float  # GB/s

    @property
    def total(self) -> int:
        return sum(self.per_token.values())

    @property
    def bound(self) -> float:
        """Batch-1 tok/s that the bandwidth allows, every weight read once a token."""
        return self.bandwidth * 1e9 / self.total


def load(config: EngineConfig) -> Loaded:
    t = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - t
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": text}]) for text in PROMPTS]
    return Loaded(engine, load_s, prompts, engine.runner.model.weight_bytes(), read_bandwidth_gbs())
