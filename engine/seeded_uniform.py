"""One uniform number per (seed, token index): a counter-based generator, so a sequence's draws
need no state, come out the same on every device, and are unchanged when a step is retried or a
sequence is preempted and resumed."""
from __future__ import annotations

_MASK = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)


def seeded_uniform(seed: int, index: int) -> float:
    """The `index`-th draw of the stream `seed` (an unsigned 64-bit value), uniform in [0, 1).

    SplitMix64's output for state seed + (index + 1) * gamma: its finaliser spreads adjacent seeds
    (choice i of a request samples with seed + i) and adjacent indices apart."""
    if not 0 <= seed <= _MASK:
        raise ValueError(f"seed {seed} is outside the unsigned 64-bit range")
    z = (seed + (index + 1) * _GAMMA) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return (z >> 11) * 2.0**-53
