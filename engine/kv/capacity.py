"""How many KV blocks to allocate: from a token count, a memory size, or (CUDA) what fits beside
the weights and the step's workspace. Pure arithmetic, so the presets can be checked anywhere.

In order of precedence:
- `kv_capacity_tokens`: exactly that many tokens (rounded up to whole blocks);
- `kv_cache_memory` (GiB): as many blocks as fit in it;
- on CUDA, vLLM's `gpu_memory_utilization`: that share of the card, minus what is in use once the
  weights are loaded, minus the workspace a step needs at most (`workspace_bytes`);
- on the CPU, `max_num_seqs` sequences of `max_model_len` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import EngineConfig, ModelConfig

GiB = 2 ** 30


def bytes_per_token(model: ModelConfig, element_size: float) -> int:
    """K and V of one token across every layer (element_size: an int8 cache's counts its rows' scales)."""
    return int(2 * model.num_layers * model.num_kv_heads * model.head_dim * element_size)


def workspace_bytes(model: ModelConfig, config: EngineConfig, element_size: int,
                    decode_reads_kv_in_place: bool = False) -> int:
    """An upper estimate of the memory one step needs beyond weights and cache: the largest
    prefill chunk's activations and attention scores, gathered K/V at max_model_len (two
    sequences' for a prefill over cached blocks; a full decode batch's where decode attention
    gathers instead of reading the blocks in place), the logits, and 256 MiB for library
    workspaces (cuBLAS) and the decode graphs."""
    chunk = max(config.max_prefill_tokens, config.max_num_seqs)
    width = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    activations = 4 * chunk * (3 * model.hidden_size + width + 3 * model.intermediate_size) * element_size
    scores = 2 * model.num_heads * chunk * config.max_model_len * 4  # fp32, with the mask beside them
    # a prefill gathers one sequence's blocks at a time (two live while the next replaces the last)
    rows = 2 if decode_reads_kv_in_place else config.max_num_seqs
    gathered = 2 * rows * config.max_model_len * model.num_kv_heads * model.head_dim * element_size
    logits = 2 * chunk * model.vocab_size * 4
    return activations + scores + gathered + logits + 256 * 2 ** 20


@dataclass(frozen=True)
class KVCapacity:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    source: str  # how it was sized, for the start-up log

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def max_concurrency(self, max_model_len: int) -> float:
        """Sequences of max_model_len tokens that fit at once."""
        return self.tokens / max_model_len

    def describe(self, max_model_len: int) -> str:
        return (f"KV cache ({self.source}): {self.num_blocks} blocks of {self.block_size} tokens = {self.tokens} "
                f"tokens, {self.nbytes / GiB:.2f} GiB; maximum concurrency for {max_model_len} tokens per "
                f"request: {self.max_concurrency(max_model_len):.2f}x")


@dataclass(frozen=True)
class DeviceMemory:
    """A GPU's memory as measured once the weights are loaded (bytes)."""

    total: int
    in_use: int


def plan_capacity(config: EngineConfig, model: ModelConfig, element_size: float,
                  device_memory: DeviceMemory | None = None, decode_reads_kv_in_place: bool = False,
                  host_available: int | None = None) -> KVCapacity:
    """`device_memory`: given on CUDA; `decode_reads_kv_in_place`: the backend's (workspace_bytes);
    `host_available`: on the CPU, the memory the process may still take (bytes, once the weights
    are loaded: MemAvailable, capped by its cgroups' memory limits). Raises ValueError when not even
    one max_model_len sequence fits, or when the cache asked for is larger than the memory free for
    it, the card's or the host's (on the CPU it was allocated and filled until the machine ran out)."""
    size = config.block_size
    per_block = size * bytes_per_token(model, element_size)
    if config.kv_capacity_tokens is not None:
        blocks, source = -(-config.kv_capacity_tokens // size), "--kv-capacity-tokens"
    elif config.kv_cache_memory is not None:
        blocks, source = int(config.kv_cache_memory * GiB) // per_block, f"--kv-cache-memory {config.kv_cache_memory:g} GiB"
    elif device_memory is not None:
        budget = (config.gpu_memory_utilization * device_memory.total - device_memory.in_use
                  - workspace_bytes(model, config, element_size, decode_reads_kv_in_place))
        blocks = max(0, int(budget) // per_block)
        source = (f"--gpu-memory-utilization {config.gpu_memory_utilization:g} of {device_memory.total / GiB:.1f} "
                  f"GiB, {device_memory.in_use / GiB:.1f} GiB in use after loading")
    else:
        blocks, source = config.max_num_seqs * -(-config.max_model_len // size), "max_num_seqs x max_model_len"
    capacity = KVCapacity(blocks, size, per_block, source)
    free, where = ((device_memory.total - device_memory.in_use, "device") if device_memory is not None
                   else (host_available, "host"))
    if free is not None and capacity.nbytes > free:
        raise ValueError(f"the KV cache ({source}) would take {capacity.nbytes / GiB:.1f} GiB, more than the "
                         f"{free / GiB:.1f} GiB of {where} memory available: lower --max-num-seqs or "
                         "--max-model-len, or size it with --kv-capacity-tokens / --kv-cache-memory")
    if capacity.tokens < config.max_model_len:
        raise ValueError(f"the KV cache holds {capacity.tokens} tokens ({source}), fewer than one sequence of "
                         f"max_model_len {config.max_model_len}: give it more memory or lower --max-model-len")
    return capacity
