"""One token a row from its filtered distribution (temperature, top-k, min-p, top-p), for a whole
batch in a few tensor operations, by inverse transform: each row brings one uniform number.

The filters, in order: temperature scales the logits; top-k keeps the k most likely tokens (their
softmax renormalised over them); min-p drops tokens below min_p times the most likely one; top-p
keeps the smallest run of the most likely tokens whose mass (after min-p) reaches top_p.

Rows with top-k or top-p need their tokens in order of probability. A full sort of the vocabulary
costs milliseconds a row on a CPU, so they sort only their most likely tokens, as many as the first
rung of `CANDIDATES` (or top_k, when larger); a row whose kept tokens may reach past those is drawn
again on the next rung, and past the last over the whole vocabulary: the result is exact either
way. Most nuclei are short (top_p 0.9 at temperature 0.7 keeps a few dozen tokens of SmolLM2's),
some reach thousands (temperature 1.3).
"""
from __future__ import annotations

import torch

from engine.rows import column, device_values, put_rows, take_rows

CANDIDATES = (128, 4096)
BLOCK = 256  # positions a block of the two-level inverse transform


def draw(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
         min_p: list[float], uniform: list[float]) -> torch.Tensor:
    """logits [R, V] float32 and each row's settings (temperature > 0, top_k 0 = off) -> token
    ids [R] (int64, on the logits' device). The logits are spent: drawing works in them."""
    top_k = [0 if k >= logits.shape[1] else k for k in top_k]  # keeping the whole vocabulary is no top-k
    plain = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if k == 0 and p >= 1.0]
    ordered = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if k != 0 or p < 1.0]
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if ordered:  # first: `plain` may take the logits themselves and overwrite them
        put_rows(tokens, ordered, _draw_ordered(take_rows(logits, ordered), *_pick(ordered, temperature, top_k, top_p,
                                                                                   min_p, uniform), CANDIDATES))
    if plain:
        part_temperature, part_min_p, part_uniform = _pick(plain, temperature, min_p, uniform)
        weights = _exp_scaled(take_rows(logits, plain), part_temperature)
        put_rows(tokens, plain, _inverse_cdf(_min_p(weights, part_min_p), part_uniform))
    return tokens


def candidates(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row's `width` most likely tokens (values, ids), most likely first and equal logits in
    the order of their ids (topk's own order among them changes with its k, which a batch's widest
    row sets), and the next value past them (None when they are the whole vocabulary)."""
    vocab = logits.shape[1]
    if width >= vocab:  # one stable sort: equal logits stay in the order of their ids
        values, ids = logits.sort(dim=-1, descending=True, stable=True)
        return values, ids, None
    values, ids = logits.topk(width + 1, dim=-1)
    following = values[:, width]
    values, ids = values[:, :width], ids[:, :width]
    new_run = values[:, 1:] != values[:, :-1]
    tied = (~new_run).any(-1).nonzero().flatten()  # rows with equal logits among their candidates
    if tied.numel():  # one sort of those rows by (run of equal values, id)
        runs = torch.cat([torch.zeros_like(tied)[:, None], new_run[tied].cumsum(-1)], dim=1)
        order = (runs * vocab + ids[tied]).argsort(dim=-1)
        values[tied], ids[tied] = values[tied].gather(1, order), ids[tied].gather(1, order)
    return values, ids, following


def _draw_ordered(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                  min_p: list[float], uniform: list[float], ladder: tuple[int, ...], floor: int = 0) -> torch.Tensor:
    """`ladder`: the candidates' counts to try for rows without top-k, in turn; `floor`: at least as
    many (a redraw's next rung)."""
    rows, vocab = logits.shape
    dev = logits.device
    width = min(vocab, max([floor] + [ladder[0] if k == 0 else k for k in top_k]))
    values, ids, following = candidates(logits, width)  # dividing by a temperature keeps the order
    # top-k keeps every token as likely as the k-th too (HF's and vLLM's ties): a row without top-k, all
    kth = values.gather(1, (device_values([k or width for k in top_k], dev) - 1)[:, None])
    kth = kth.masked_fill(device_values([k == 0 for k in top_k], dev)[:, None], float("-inf"))
    weights = _min_p(_exp_scaled(values.masked_fill(values < kth, float("-inf")), temperature), min_p)
    last_kept = weights[:, -1] > 0  # by top-k and min-p: if its equals run on past the candidates, so do they
    # top-p's mass is that of the tokens top-k and min-p kept: top-k renormalises over its k tokens
    # (those min-p kept), a row without top-k over the whole vocabulary's tokens min-p kept
    scale = weights.sum(-1)
    unbounded = [i for i, k in enumerate(top_k) if k == 0]
    may_reach_past = bool(unbounded) and width < vocab  # a row without top-k, candidates short of the vocabulary
    if may_reach_past:  # (its scale from the whole vocabulary; a tied run past the candidates: redrawn below)
        part_temperature, part_min_p = _pick(unbounded, temperature, min_p)
        part = take_rows(logits, unbounded)  # a copy, or the logits themselves, which a redraw still needs
        put_rows(scale, unbounded,
                 _min_p(_exp_scaled(part.clone() if part is logits else part, part_temperature), part_min_p).sum(-1))
    weights = weights / scale[:, None]
    if any(p < 1.0 for p in top_p):
        before = weights.cumsum(-1) - weights  # mass of the more likely kept tokens
        # rows without top-p keep every token (a float32 running sum may reach 1 before the tail)
        limit = column([p if p < 1.0 else float("inf") for p in top_p], weights)
        weights = weights.masked_fill(before >= limit, 0.0)
    tokens = ids.gather(1, _inverse_cdf(weights, uniform)[:, None]).squeeze(1)
    if following is not None:
        # a row goes on past its candidates where it may keep a token past them: one without top-k
        # whose last candidate is still kept, or one whose last run of equal logits goes on past them
        # while top-k and min-p keep it (top-k's and top-p's mass would miss the rest of it) or top-p
        # keeps any of it (which of the run are candidates is topk's choice, not the ids' order)
        last = values[:, -1:]
        tied = (following == last[:, 0]) & (last_kept | ((weights > 0) & (values == last)).any(-1))
        reaches = torch.zeros_like(tied)
        if unbounded:
            reaches[device_values(unbounded, dev)] = weights[device_values(unbounded, dev), -1] > 0
        again = [i for i, flag in enumerate((tied | reaches).tolist()) if flag]
        if again:
            rest = tuple(w for w in ladder[1:] if w > width) or (vocab,)
            put_rows(tokens, again, _draw_ordered(take_rows(logits, again), *_pick(again, temperature, top_k, top_p,
                                                                                   min_p, uniform), rest, rest[0]))
    return tokens


def _exp_scaled(logits: torch.Tensor, temperature: list[float]) -> torch.Tensor:
    """exp((logits - row max) / temperature), in place: the softmax's numerators (the most
    likely token's is 1)."""
    t = column(temperature, logits)
    return logits.div_(t).sub_(logits.amax(-1, keepdim=True)).exp_()


def _min_p(weights: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    if not any(min_p):
        return weights
    floor = column(min_p, weights) * weights.amax(-1, keepdim=True)
    return weights.masked_fill(weights < floor, 0.0)


def _inverse_cdf(weights: torch.Tensor, uniform: list[float]) -> torch.Tensor:
    """Per row, the position whose share of the row's (unnormalised) weights the uniform number
    falls in; a position of weight 0 is never drawn.

    In two levels, so the weights are read once: the row's blocks of `BLOCK` positions are summed
    and their running sums (float64) pick the block; then the running sum within that block picks
    the position."""
    rows, width = weights.shape
    dev = weights.device
    whole = width // BLOCK * BLOCK
    sums = [weights[:, :whole].view(rows, -1, BLOCK).sum(-1)] if whole else []
    if whole < width:
        sums.append(weights[:, whole:].sum(-1, keepdim=True))
    block_cdf = torch.cat(sums, dim=1).cumsum(-1, dtype=torch.float64)
    target = device_values(uniform, dev, torch.float64)[:, None] * block_cdf[:, -1:]
    block = _first_past(block_cdf, target)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * BLOCK + torch.arange(BLOCK, device=dev)[None, :]
    inside = weights.gather(1, columns.clamp(max=width - 1)).masked_fill(columns >= width, 0.0)
    inner_cdf = inside.cumsum(-1, dtype=torch.float64)
    position = block * BLOCK + _first_past(inner_cdf, target - before)
    return position.squeeze(1).clamp(max=width - 1)  # in range even for weights that are not numbers (NaN logits)


def _first_past(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[rows, 1]: the first position whose running sum passes the target, or, where rounding puts
    the target at or past the total, the last position with weight."""
    drawn = torch.searchsorted(cdf, target, right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())  # the running sum reaches its total there
    return torch.minimum(drawn, last)


def _pick(rows: list[int], *settings: list) -> list[list]:
    return [[values[i] for i in rows] for values in settings]
