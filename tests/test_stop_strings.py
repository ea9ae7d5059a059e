"""Stop strings: found as soon as they complete, in time linear in the output."""
from __future__ import annotations

import random

from engine.stop_strings import StopStringMatcher


def test_stop_strings_match_a_brute_force_reference():
    """Random texts over small alphabets (many partial matches), fed in random pieces: the first stop
    string to complete is found, and the held-back tail is the longest proper prefix of a stop."""
    rng = random.Random(0)
    for trial in range(2000):
        alphabet = "ab" if trial % 2 else "abc"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        matcher, fed, hit = StopStringMatcher(stops), 0, None
        while fed < len(text) and hit is None:
            end = rng.randint(fed + 1, len(text))
            hit = matcher.feed(text[fed:end])
            fed = end
            if hit is None:
                held = max((n for s in stops for n in range(1, len(s)) if text[:fed].endswith(s[:n])), default=0)
                assert matcher.held_back == held, (text, stops, fed)
        found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        expected = min(found)[1] if found else None  # earliest end; on a tie, the earliest start
        assert hit == expected, (text, stops)
        if found:  # which stop it was: the one that starts there (vLLM's stop_reason)
            assert matcher.matched == text[expected:min(found)[0]], (text, stops)
        else:
            assert matcher.matched is None
