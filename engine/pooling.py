"""How an embeddings request turns its input into one vector: the model's final (normed) hidden
states at the input's positions, pooled, then scaled to unit length (as OpenAI's embeddings are).

`mean` averages every position (what llama.cpp's `--pooling mean` does; a causal model's last
state alone mostly predicts the next token); `last` takes the final position (vLLM's default for
models trained as embedders, such as e5-mistral). Plain numbers: the runner hands each prefill
chunk's share over as a list, so a sequence holds no tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

POOLING_METHODS = ("mean", "last")


@dataclass
class Pooling:
    method: str  # one of POOLING_METHODS
    rows: int = 0  # leading input positions pooled so far
    total: list[float] = field(default_factory=list)  # their sum (mean), the last position's state (last)

    def __post_init__(self):
        if self.method not in POOLING_METHODS:
            raise ValueError(f"pooling {self.method!r}: one of {', '.join(POOLING_METHODS)}")

    @property
    def needs_every_position(self) -> bool:
        """Whether positions before the last are pooled: then none may come from the prefix cache."""
        return self.method == "mean"

    def positions(self, start: int, end: int, length: int) -> range:
        """The positions of a chunk [start, end) of a `length`-token input still to pool (a
        preempted sequence computes its input again: what it pooled before is not pooled twice)."""
        if self.method == "last":
            return range(length - 1, length) if end == length else range(0)
        return range(max(start, self.rows), end)

    def add(self, positions: range, summed: list[float]) -> None:
        """`summed`: the sum of the hidden states at `positions` (from `positions`)."""
        if not positions:
            return
        self.total = [a + b for a, b in zip(self.total, summed)] if self.total and self.method == "mean" else summed
        self.rows = positions.stop

    def vector(self) -> list[float]:
        """The embedding: the pooled state at unit length (a mean's count cancels out; a zero state
        stays zero). Raises ValueError for a state that is not finite (a model that overflowed)."""
        norm = math.sqrt(math.fsum(x * x for x in self.total))
        if not math.isfinite(norm):
            raise ValueError("the model's hidden states are not finite: no embedding can be made of them")
        return [x / norm for x in self.total] if norm > 0 else [0.0] * len(self.total)
