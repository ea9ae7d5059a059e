"""Per-row values from the host, and subsets of a step's rows, for the sampler's batched tensors."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory, without waiting: a copy from
    pageable memory would first wait for every kernel queued before it."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def device_values(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list as a tensor on `device` (`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """[len(values), 1] in `like`'s dtype and device: one value per row, to broadcast over its columns."""
    return device_values(values, like.device, like.dtype)[:, None]


def padded(rows: list[list], like: torch.Tensor, pad=None, dtype=torch.long) -> torch.Tensor:
    """[len(rows), longest] on `like`'s device: each row padded with `pad`, or with its own first
    entry (None: an index that repeats one the row already has)."""
    width = max(1, max(len(row) for row in rows))
    return device_values([row + [row[0] if pad is None else pad] * (width - len(row)) for row in rows],
                         like.device, dtype)


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows at `rows` (ascending positions): t itself when they are all of its rows."""
    return t if len(rows) == t.shape[0] else t[device_values(rows, t.device)]


def put_rows(t: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    """Write `values` into t's rows at `rows` (ascending positions), in place."""
    if len(rows) == t.shape[0]:
        t.copy_(values)
    else:
        t[device_values(rows, t.device)] = values
