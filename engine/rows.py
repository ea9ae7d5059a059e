"""A subset of a batch's rows, by position: read without a copy when the subset is every row."""
from __future__ import annotations

import torch


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows at `rows` (ascending positions): t itself when they are all of its rows."""
    return t if len(rows) == t.shape[0] else t[torch.tensor(rows, device=t.device)]


def put_rows(t: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    """Write `values` into t's rows at `rows` (ascending positions), in place."""
    if len(rows) == t.shape[0]:
        t.copy_(values)
    else:
        t[torch.tensor(rows, device=t.device)] = values
