"""Typical sampling (Meister et al., "Locally Typical Sampling", 2022), as transformers'
TypicalLogitsWarper and TGI apply it: last of the filters, after the temperature, top-k, min-p and
top-p, keep the tokens whose surprisal (-log p) is closest to the entropy of what those left,
fewest first, until their mass reaches `typical_p` (the one that crosses it kept too, and always at
least one). Rows that ask for it are filtered here over their whole sorted vocabulary (a full sort
per row: only they pay it), then drawn by engine/categorical.py with no filter of its own."""
from __future__ import annotations

import torch

from engine.rows import column, device_values


def mask_filtered(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                  min_p: list[float], typical_p: list[float]) -> torch.Tensor:
    """logits [R, V] float32 and each row's settings (temperature > 0; top_k 0 = off) -> the same
    logits with -inf where a token is outside what the filters keep, in place, in engine/categorical.py's
    order and with its rules (top-k keeps the tokens as likely as the k-th; min-p against the most
    likely token; top-p's mass over what top-k and min-p kept), then the typical set."""
    vocab = logits.shape[1]
    scaled = logits / column(temperature, logits)
    values, order = scaled.sort(dim=-1, descending=True, stable=True)
    k = device_values([k if 0 < k < vocab else vocab for k in top_k], logits.device)
    keep = values >= values.gather(1, (k - 1)[:, None])
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    if any(min_p):
        keep &= probs >= column(min_p, probs) * probs[:, :1]
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if any(p < 1.0 for p in top_p):
        limit = column([p if p < 1.0 else float("inf") for p in top_p], probs)
        keep &= probs.cumsum(-1) - probs < limit
    dropped = ~keep
    logits.masked_fill_(dropped.scatter(1, order, dropped), float("-inf"))
    return mask_atypical(logits, temperature, typical_p)


def mask_atypical(logits: torch.Tensor, temperature: list[float], typical_p: list[float]) -> torch.Tensor:
    """logits [R, V] float32 (each row's temperature > 0, typical_p in (0, 1]) -> the same logits
    with -inf where a token is outside its row's typical set, in place (a -inf token is outside,
    and the rest's distribution is renormalised over what is left)."""
    log_p = torch.log_softmax(logits / column(temperature, logits), dim=-1)
    p = log_p.exp()
    entropy = -(log_p * p).nansum(-1, keepdim=True)  # (0 x -inf, a masked token's, is NaN: left out)
    distance = (-log_p - entropy).abs()
    distance, order = distance.sort(dim=-1, stable=True)
    mass = p.gather(1, order).cumsum(-1)
    last = (mass < column(typical_p, mass)).sum(-1, keepdim=True).clamp_(max=logits.shape[1] - 1)
    dropped = distance > distance.gather(1, last)
    dropped[:, 0] = False
    return logits.masked_fill_(dropped.scatter(1, order, dropped), float("-inf"))
