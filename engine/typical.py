"""Typical sampling (Meister et al., "Locally Typical Sampling", 2022), as transformers'
TypicalLogitsWarper and TGI apply it: after the temperature, keep the tokens whose surprisal
(-log p) is closest to the distribution's entropy, fewest first, until their mass reaches
`typical_p` (the one that crosses it kept too, and always at least one). A full sort of the
vocabulary per row: only rows that ask for it pay it."""
from __future__ import annotations

import torch

from engine.rows import column


def mask_atypical(logits: torch.Tensor, temperature: list[float], typical_p: list[float]) -> torch.Tensor:
    """logits [R, V] float32 (each row's temperature > 0, typical_p in (0, 1)) -> the same logits
    with -inf where a token is outside its row's typical set, in place."""
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
