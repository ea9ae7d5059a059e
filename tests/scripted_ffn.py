"""FFNs whose branch gives each row a chosen cos(h, h + FFN(h)), to drive skip gates layer by layer.

Hidden vectors carry the row's id in column 0 (so an FFN called on a subset of rows, as the host
gates do, still knows whose rows it got), a base magnitude in column 1, and one fresh column per
layer: layer j's branch lives in column 2 + j, orthogonal to h, with the length that yields
cos_table[j][row]."""
from __future__ import annotations

import torch


def initial_hidden(rows: int, num_layers: int) -> torch.Tensor:
    h = torch.zeros(rows, 2 + num_layers)
    h[:, 0] = torch.arange(rows, dtype=torch.float32)
    h[:, 1] = 1.0
    return h


def branch(layer: int, cos_table: list[list[float]]):
    """FFN(h) for layer `layer`: the orthogonal part that makes cos(h, h + FFN(h)) = cos_table[layer][row]."""
    def ffn(h: torch.Tensor) -> torch.Tensor:
        ids = h[:, 0].round().long()
        cos = torch.tensor([cos_table[layer][i] for i in ids.tolist()])
        out = torch.zeros_like(h)
        out[:, 2 + layer] = h.norm(dim=-1) * (1.0 / cos ** 2 - 1.0).sqrt()
        return out
    return ffn


def masked(ffn):
    """The same FFN as the CUDA backend's masked FFN calls it: (h, run) -> h + FFN(h) where run."""
    def call(h: torch.Tensor, run: torch.Tensor | None) -> torch.Tensor:
        out = h + ffn(h)
        return out if run is None else torch.where(run.bool()[:, None], out, h)
    return call


def run_layers(gate, rows: int, cos_table: list[list[float]], masked_ffn: bool = False) -> torch.Tensor:
    """Every layer: h = x (no attention: the FFN branch alone moves the residual), x = gate(...)."""
    x = initial_hidden(rows, len(cos_table))
    for layer in range(len(cos_table)):
        ffn = branch(layer, cos_table)
        x = gate(layer, x, masked(ffn) if masked_ffn else ffn)
    return x
