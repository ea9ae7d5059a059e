"""The served LoRA adapters (vLLM's `--lora-modules name=path`): each read once at start into a
slot, its per-module pairs fused onto this engine's projections (q|k|v and gate|up are one
projection each here: an adapter's A matrices stacked, its B matrices placed block-diagonally at
their rows, zeros where it leaves a module alone), and the rows of a forward assigned to slots
(`applied`). Adapters stay resident: a batch mixes any of them and the base model, each row its own.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.lora.adapter import LoRAAdapter, combined, read_adapter
from engine.lora.errors import AdapterError
from engine.lora.names import DEFAULT_ADAPTER, scaled_name
from engine.lora.linear import LoRALinear, StepRows

log = logging.getLogger("skipserve.lora")

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def projection_parts(layer, cfg: ModelConfig) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """A layer's projections an adapter may change: attribute -> ([(module, its output rows)], input
    features). A mixture's experts are not among them (its attention is)."""
    q, kv, hidden = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    names = getattr(layer, "qkv_names", QKV)
    parts = {"qkv": (list(zip(names, [q, kv, kv] if len(names) == 3 else [q + 2 * kv])), hidden),
             "o_proj": ([("self_attn.o_proj", hidden)], q)}
    if hasattr(layer, "gate_up") and hasattr(layer, "down"):
        inter = cfg.intermediate_size
        names = getattr(layer, "gate_up_names", GATE_UP)
        parts["gate_up"] = (list(zip(names, [inter, inter] if len(names) == 2 else [2 * inter])), hidden)
        parts["down"] = ([("mlp.down_proj", hidden)], inter)
    return parts


def fused_pair(adapter: LoRAAdapter, prefix: str, parts: list[tuple[str, int]], in_features: int):
    """One projection's (A [sum r, in], B [out, sum r]) from the adapter's pairs of its row blocks, or
    None where the adapter changes none of them."""
    present = [(module, rows, adapter.weights[prefix + module]) for module, rows in parts
               if prefix + module in adapter.weights]
    if not present:
        return None
    for module, rows, (a, b) in present:
        if a.shape[1] != in_features or b.shape[0] != rows:
            raise AdapterError(f"LoRA adapter {adapter.name!r}: {prefix}{module} is [{rows}, {in_features}] in this "
                               f"model, the adapter's pair makes [{b.shape[0]}, {a.shape[1]}] (an adapter for "
                               "another model?)")
    stacked_a = torch.cat([a for _, _, (a, _) in present])
    placed_b = torch.zeros(sum(rows for _, rows in parts), stacked_a.shape[0])
    offsets = dict(zip((m for m, _ in parts), [sum(r for _, r in parts[:i]) for i in range(len(parts))]))
    column = 0
    for module, rows, (a, b) in present:
        placed_b[offsets[module]:offsets[module] + rows, column:column + a.shape[0]] = b
        column += a.shape[0]
    return stacked_a, placed_b


class LoRARegistry:
    """The adapters of a model, by name, on its projections once `wrap` put a `LoRALinear` around each.

    Adapters are read into pairs before they are installed: those named at start before the KV
    cache is sized from the memory left (the runner), those loaded at run time (vLLM's
    /v1/load_lora_adapter) off the engine thread, their pairs installed under a new slot before
    the name is published. A name withdrawn is gone for new requests at once, and its slot's pairs
    are removed on the engine thread once no sequence holds the slot. Slots are never reused (a
    cached prefix is keyed by its slot), and `slots` and `adapters` are replaced whole on each
    change, so another thread reads either one consistent mapping or the next."""

    def __init__(self, model, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, ops):
        self.device, self.dtype, self.ops = device, dtype, ops  # ops: the backend, whose linear layers run the pairs
        self.cfg = cfg
        self.rows = StepRows(device)
        self.slots: dict[str, int] = {}
        self.names: dict[int, str] = {}  # slot -> the name it was served under, until its pairs are removed
        self.adapters: dict[str, LoRAAdapter] = {}
        self._reserved: set[str] = set()  # names being loaded
        self._next_slot = 1
        self.version = 0  # counts the loads (a backend's tables built from the pairs follow)
        self._lock = threading.Lock()  # `version` and `names`: changed on the event loop and the engine thread
        self.on_remove: list[Callable[[], None]] = []  # called once a slot's pairs are gone (engine thread)
        self._parts = [projection_parts(layer, cfg) for layer in model.layers]  # per layer: attr -> (parts, in)
        self._linears: list[dict[str, LoRALinear]] = []  # per layer: attr -> its LoRALinear (`wrap`)
        # llama-server's --lora adapters (`read_default`), and the scales requests naming the model take them at
        self.default_files: list[LoRAAdapter] = []
        self.default_scales: list[float] = []

    def wrap(self, model) -> None:
        """A LoRALinear around each projection an adapter may change (after the backend's fused
        paths took the base projections: rows of no adapter keep them)."""
        for layer, parts in zip(model.layers, self._parts):
            linears = {attr: LoRALinear(getattr(layer, attr), self.rows) for attr in parts}
            for attr, linear in linears.items():
                setattr(layer, attr, linear)
            self._linears.append(linears)

    def load(self, name: str, path: str, max_rank: int | None = None) -> LoRAAdapter:
        """Reads the adapter into a new slot and serves it; AdapterError (nothing changed) where it
        does not fit the model."""
        slot = self.reserve(name)
        try:
            adapter, pairs = self.read(name, path, max_rank)
        finally:
            self.release(name)
        self.install(slot, name, adapter, pairs)
        return adapter

    def read_default(self, files: list[tuple[str, float]], max_rank: int | None = None) -> tuple[LoRAAdapter, dict]:
        """llama-server's --lora / --lora-scaled adapters (files, scales) read and kept (each checked
        against the model whatever its scale: a file at 0 is scaled while serving), and combined at
        their scales, with its pairs (`read_scaled`)."""
        self.default_files = [self.read_file(Path(path).name, path, max_rank) for path, _ in files]
        for adapter, (_, scale) in zip(self.default_files, files):
            if scale == 0:  # (left out of the combination below, which checks the others)
                self.fused_pairs(adapter)
        return self.read_scaled([scale for _, scale in files])

    def read_scaled(self, scales: list[float]) -> tuple[LoRAAdapter, dict]:
        """llama-server's adapters combined at `scales` (one a file; those at 0 left out) and its pairs
        (as `read`; none where every scale is 0). No state changed."""
        parts = [(adapter, scale) for adapter, scale in zip(self.default_files, scales) if scale != 0]
        name = f"--lora at scales {[float(s) for s in scales]}"  # (what messages call it)
        if not parts:
            return LoRAAdapter(name, ", ".join(a.path for a in self.default_files), 0, {}), {}
        return self.pairs_of(combined(name, parts))

    def install_scaled(self, scales: list[float], adapter: LoRAAdapter, pairs: dict) -> str:
        """`read_scaled`'s adapter served under its scales' name (`scaled_name`) -> that name."""
        name = scaled_name(scales)
        self.install(self.reserve(name), name, adapter, pairs)
        return name

    def set_default(self, name: str | None, scales: list[float]) -> str | None:
        """Requests naming the model go through the combination served as `name` (llama-server's
        adapters at `scales`; None: the model alone) from now on -> the combination they went through
        before, if any, which stays served under its own name (for requests asking for its scales)
        until withdrawn. A request that named the model takes the slot the name has when it is added."""
        before = scaled_name(self.default_scales) if any(self.default_scales) else None
        self.default_scales = [float(s) for s in scales]
        self.slots = {**self.slots, DEFAULT_ADAPTER: self.slots[name] if name is not None else 0}
        self.adapters = ({**self.adapters, DEFAULT_ADAPTER: self.adapters[name]} if name is not None else
                         {n: a for n, a in self.adapters.items() if n != DEFAULT_ADAPTER})
        log.info("llama-server's LoRA adapters at scales %s for requests naming the model", self.default_scales)
        return before if before in self.slots and before != name else None

    def reserve(self, name: str) -> int:
        """A new slot for an adapter `name` about to be read (`install` serves it; on failure, `release`)."""
        if name in self.slots or name in self._reserved:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
        self._reserved.add(name)
        self._next_slot += 1
        return self._next_slot - 1

    def release(self, name: str) -> None:
        self._reserved.discard(name)

    def read(self, name: str, path: str, max_rank: int | None = None) -> tuple[LoRAAdapter, dict]:
        """The adapter and its fused pairs on the device, as the backend's linear layers, by (layer,
        projection) (no state changed)."""
        return self.pairs_of(self.read_file(name, path, max_rank))

    def read_file(self, name: str, path: str, max_rank: int | None = None) -> LoRAAdapter:
        """The adapter's file or folder read (checked against this model's config; no state changed)."""
        return read_adapter(name, path, max_rank, self.cfg)

    def fused_pairs(self, adapter: LoRAAdapter) -> dict:
        """The adapter's pairs fused onto this model's projections: (layer, projection) -> (A, B) in
        fp32 on the CPU; AdapterError where it changes what this model has not, or another shape."""
        name = adapter.name
        known = {f"model.layers.{i}.{module}" for i, parts in enumerate(self._parts)
                 for modules, _ in parts.values() for module, _ in modules}
        unknown = sorted(set(adapter.weights) - known)
        if unknown:
            raise AdapterError(f"LoRA adapter {name!r} changes {unknown[0]}"
                               f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}, which this model "
                               "has not as a dense projection (its layers, a mixture's experts)")
        pairs = {}
        for i, parts in enumerate(self._parts):
            for attr, (modules, in_features) in parts.items():
                pair = fused_pair(adapter, f"model.layers.{i}.", modules, in_features)
                if pair is not None:
                    pairs[i, attr] = pair
        return pairs

    def pairs_of(self, adapter: LoRAAdapter) -> tuple[LoRAAdapter, dict]:
        """The adapter and its fused pairs as the backend's linear layers in the activations' dtype on
        the device; AdapterError where they do not fit there, or a scale made them overflow it."""
        name = adapter.name
        pairs = {}
        try:
            for key, pair in self.fused_pairs(adapter).items():
                tensors = [t.to(self.device, self.dtype).contiguous() for t in pair]
                if not all(torch.isfinite(t).all() for t in tensors):
                    raise AdapterError(f"LoRA adapter {name!r}: its weights at this scale are not finite in "
                                       f"{str(self.dtype).removeprefix('torch.')} (NaN or infinity: a damaged "
                                       "file, or a scale too large?)")
                pairs[key] = tuple(self.ops.linear([t]) for t in tensors)
        except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
            raise AdapterError(f"LoRA adapter {name!r} does not fit in the {self.device.type} memory left: "
                               f"{exc}") from None
        return adapter, pairs

    def install(self, slot: int, name: str, adapter: LoRAAdapter, pairs: dict) -> None:
        """The pairs under `slot`, then the name published (no forward has a row of the slot before)."""
        for (i, attr), pair in pairs.items():
            self._linears[i][attr].pairs[slot] = pair
        with self._lock:
            self.version += 1
            self.names = {**self.names, slot: name}
        self.release(name)
        self.slots = {**self.slots, name: slot}
        self.adapters = {**self.adapters, name: dataclasses.replace(adapter, weights={})}  # (the pairs serve it)
        log.info("LoRA adapter %r from %s: rank %d, %d projections changed", name, adapter.path, adapter.rank,
                 len(pairs))

    def withdraw(self, name: str) -> int:
        """The name unpublished (KeyError if not served) -> its slot, for `remove` once no sequence holds it."""
        slot = self.slots[name]
        self.slots = {n: s for n, s in self.slots.items() if n != name}
        self.adapters = {n: a for n, a in self.adapters.items() if n != name}
        return slot

    def remove(self, slot: int) -> None:
        """A withdrawn slot's pairs dropped (the engine thread, with no sequence of the slot left)."""
        for linears in self._linears:
            for linear in linears.values():
                linear.pairs.pop(slot, None)
        for forget in self.on_remove:
            forget()
        with self._lock:
            self.names = {s: n for s, n in self.names.items() if s != slot}
        log.info("LoRA adapter slot %d removed", slot)

    def holds(self, slot: int) -> bool:
        """Whether any projection still has pairs of `slot`."""
        return any(slot in linear.pairs for linears in self._linears for linear in linears.values())

    @contextmanager
    def applied(self, slots: list[int]):
        """Rows i of the forward inside use adapter slot `slots[i]` (0: the base model)."""
        self.rows.assign(slots)
        try:
            yield
        finally:
            self.rows.assign([])
