"""Typical sampling (Meister et al., "Locally Typical Sampling", 2022), as transformers'
TypicalLogitsWarper and TGI apply it: last of the filters, after the temperature, top-k, min-p and
top-p, keep the tokens whose surprisal (-log p) is closest to the entropy of what those left,
fewest first, until their mass reaches `typical_p` (the one that crosses it kept too, and always at
least one). Rows that ask for it are filtered here, then drawn by engine/categorical.py with no
filter of its own.

A row with top-k, top-p or min-p keeps a run of its most likely tokens: it is filtered over its
`CANDIDATES` most likely (a top-k and a short sort), and again over more where what it keeps may
run past them; a row with none of them, over its whole vocabulary, cut among the tokens nearest
its entropy (`ATYPICAL_CANDIDATES`: a top-k of the distances, where a sort of the vocabulary took
~1.9 ms a row on a 2-core host)."""
from __future__ import annotations

import torch

from engine.categorical import candidates
from engine.rows import column, device_values, put_rows, take_rows

CANDIDATES = (128, 4096)
ATYPICAL_CANDIDATES = (256, 4096)  # tokens nearest the entropy a row is first cut among, then more


def mask_filtered(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                  min_p: list[float], typical_p: list[float], min_p_last: bool = False) -> torch.Tensor:
    """logits [R, V] float32 and each row's settings (temperature > 0; top_k 0 = off) -> the same
    logits with -inf where a token is outside what the filters keep, in place, in engine/categorical.py's
    order and with its rules (top-k keeps the tokens as likely as the k-th; min-p against the most
    likely token; top-p's mass over what top-k and min-p kept), then the typical set. `min_p_last`:
    llama.cpp's order instead, min-p after top-p (top-p's mass over what top-k kept)."""
    vocab = logits.shape[1]
    top_k = [k if 0 < k < vocab else 0 for k in top_k]
    settings = (temperature, top_k, top_p, min_p, typical_p)
    bounded = [i for i in range(len(top_k)) if top_k[i] or top_p[i] < 1.0 or min_p[i] > 0.0]
    whole = [i for i in range(len(top_k)) if i not in set(bounded)]
    if whole:
        put_rows(logits, whole, mask_atypical(take_rows(logits, whole), *_pick(whole, temperature, typical_p)))
    if bounded:
        put_rows(logits, bounded, _mask_run(take_rows(logits, bounded), *_pick(bounded, *settings), CANDIDATES,
                                            min_p_last))
    return logits


def _mask_run(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
              min_p: list[float], typical_p: list[float], ladder: tuple[int, ...],
              min_p_last: bool = False) -> torch.Tensor:
    """Rows whose filters keep a run of their most likely tokens: filtered over the first rung of
    `ladder` (or top_k + 1, when larger), equal logits in the order of their ids (as categorical.py
    takes them, whatever the batch beside); rows whose run may go on past it, again on the next."""
    rows, vocab = logits.shape
    width = min(vocab, max([ladder[0] if ladder else vocab] + [k + 1 for k in top_k]))
    scaled = logits / column(temperature, logits)
    values, order, following = candidates(scaled, width)
    dev = logits.device
    has_k = device_values([k > 0 for k in top_k], dev)[:, None]
    has_m = device_values([m > 0.0 for m in min_p], dev)[:, None]
    kth = values.gather(1, (device_values([k or width for k in top_k], dev) - 1)[:, None])
    keep = values >= torch.where(has_k, kth, torch.full_like(kth, float("-inf")))
    # probabilities: top-k's over its kept tokens, the others' over the whole vocabulary
    whole = (values - scaled.logsumexp(-1, keepdim=True)).exp()
    probs = torch.where(has_k, torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1), whole)
    if any(min_p):
        keep &= ~has_m | (probs >= column(min_p, probs) * probs[:, :1])
        if not min_p_last:  # (min-p cuts a run's tail: after top-p, it changes nothing top-p keeps before it)
            probs = probs.masked_fill(~keep, 0.0)
            probs = torch.where(has_m, probs / probs.sum(-1, keepdim=True), probs)  # (min-p's rows only)
    # top-k's or min-p's tokens up to the last candidate: more may follow, and top-p's mass would miss them
    last = values[:, -1].isfinite()  # (a row with fewer tokens than candidates has them all)
    short = keep[:, -1] & last & (has_k | has_m)[:, 0]
    if any(p < 1.0 for p in top_p):
        limit = column([p if p < 1.0 else float("inf") for p in top_p], probs)
        keep &= probs.cumsum(-1) - probs < limit
    kept = values.masked_fill(~keep, float("-inf"))
    kept = mask_atypical(kept, [1.0] * rows, typical_p)  # (over the run: what the filters left, renormalised)
    out = torch.full_like(logits, float("-inf")).scatter_(1, order, torch.where(kept.isfinite(), logits.gather(
        1, order), float("-inf")))
    if following is not None:  # a run that reaches the last candidate, or a run of its equals kept, may go on
        tied = last & (following == values[:, -1]) & (keep & (values == values[:, -1:])).any(-1)
        again = (short | (keep[:, -1] & last) | tied).nonzero().flatten().tolist()
        if again:
            rest = tuple(w for w in ladder[1:] if w > width)
            put_rows(out, again, _mask_run(take_rows(logits, again), *_pick(again, temperature, top_k, top_p, min_p,
                                                                                typical_p), rest, min_p_last))
    return logits.copy_(out)


def mask_atypical(logits: torch.Tensor, temperature: list[float], typical_p: list[float],
                  ladder: tuple[int, ...] | None = None) -> torch.Tensor:
    """logits [R, V] float32 (each row's temperature > 0, typical_p in (0, 1]) -> the same logits
    with -inf where a token is outside its row's typical set, in place (a -inf token is outside,
    and the rest's distribution is renormalised over what is left).

    The set is the tokens nearest the entropy, by mass: a row is cut among its `ladder[0]` nearest
    (a top-k, not a sort of the vocabulary) where their mass reaches typical_p, else again among
    the next rung's, else over the whole row. Which of equally near tokens comes first does not
    matter: the cut keeps every token as near as the last one kept."""
    rows, vocab = logits.shape
    ladder = ATYPICAL_CANDIDATES if ladder is None else ladder
    log_p = torch.log_softmax(logits / column(temperature, logits), dim=-1)
    p = log_p.exp()
    entropy = -(log_p * p).nansum(-1, keepdim=True)  # (0 x -inf, a masked token's, is NaN: left out)
    distance = (-log_p - entropy).abs()
    width = ladder[0] if ladder and ladder[0] < vocab else vocab
    if width < vocab:
        near, order = distance.neg().topk(width, dim=-1)
        near = near.neg()
    else:
        near, order = distance.sort(dim=-1, stable=True)
    mass = p.gather(1, order).cumsum(-1)
    before = (mass < column(typical_p, mass)).sum(-1, keepdim=True)  # tokens before the one that crosses
    cut = near.gather(1, before.clamp(max=width - 1))
    dropped = (distance > cut).scatter_(1, order[:, :1], False)  # (the nearest always kept)
    short = before[:, 0] >= width  # rows whose nearest tokens' mass is short of typical_p: cut further on
    logits.masked_fill_(dropped & ~short[:, None], float("-inf"))
    again = short.nonzero().flatten().tolist() if width < vocab else []
    if again:
        put_rows(logits, again, mask_atypical(take_rows(logits, again), *_pick(again, temperature, typical_p),
                                              ladder[1:]))
    return logits


def _pick(rows: list[int], *settings: list) -> list[list]:
    return [[values[i] for i in rows] for values in settings]
