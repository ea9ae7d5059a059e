"""KV capacity from memory: the CUDA preset's arithmetic on the CPU, and the explicit sizes."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.kv.capacity import GiB, DeviceMemory, bytes_per_token, plan_capacity, workspace_bytes
from server.config_file import load_config, preset_path

# Llama-2-7B's published shapes (its config.json)
LLAMA_2_7B = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
    num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
    max_position_embeddings=4096, tie_word_embeddings=False, eos_token_ids=[2])
BF16 = 2


def weight_bytes(m: ModelConfig, element_size: int) -> int:
    per_layer = 4 * m.hidden_size ** 2 + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size
    return (2 * m.vocab_size * m.hidden_size + m.num_layers * per_layer + m.hidden_size) * element_size


def test_the_7b_cuda_preset_fits_an_80_gb_card_and_serves_64_requests():
    config = load_config(preset_path("llama-2-7b-chat-cuda"))
    card = 80 * 10 ** 9
    in_use = weight_bytes(LLAMA_2_7B, BF16) + GiB // 2  # the weights and the CUDA context
    per_token = bytes_per_token(LLAMA_2_7B, BF16)
    # what the slot layout asked for: a max_model_len slot per row, more than the whole card
    assert config.max_num_seqs * config.max_model_len * per_token > card
    capacity = plan_capacity(config, LLAMA_2_7B, BF16, DeviceMemory(total=card, in_use=in_use))
    used = in_use + workspace_bytes(LLAMA_2_7B, config, BF16)
    assert used + capacity.nbytes <= config.gpu_memory_utilization * card  # it starts
    assert used + capacity.nbytes + capacity.bytes_per_block > config.gpu_memory_utilization * card  # all of it
    assert capacity.tokens >= config.max_num_seqs * 1024  # 64 concurrent requests of 1k tokens
    assert capacity.max_concurrency(config.max_model_len) >= 1
    assert "maximum concurrency for 4096 tokens per request" in capacity.describe(config.max_model_len)


def test_decode_reading_kv_in_place_reserves_no_gathered_batch():
    """The Triton paged attention (CUDA with triton) reads blocks in place: the room a decode
    batch's gathered K/V would take goes to the cache, two sequences' stay (a prefill over cached
    blocks gathers them, one sequence at a time)."""
    config = load_config(preset_path("llama-2-7b-chat-cuda"))
    card, in_use = 80 * 10 ** 9, weight_bytes(LLAMA_2_7B, BF16) + GiB // 2
    gathering = plan_capacity(config, LLAMA_2_7B, BF16, DeviceMemory(card, in_use))
    in_place = plan_capacity(config, LLAMA_2_7B, BF16, DeviceMemory(card, in_use), decode_reads_kv_in_place=True)
    one_sequence = config.max_model_len * bytes_per_token(LLAMA_2_7B, BF16) // LLAMA_2_7B.num_layers  # a layer at a time
    freed = (config.max_num_seqs - 2) * one_sequence  # 62 x 64 MiB
    assert in_place.nbytes - gathering.nbytes == pytest.approx(freed, abs=in_place.bytes_per_block)
    used = in_use + workspace_bytes(LLAMA_2_7B, config, BF16, decode_reads_kv_in_place=True)
    assert used + in_place.nbytes <= config.gpu_memory_utilization * card


def test_kv_cache_memory_and_token_count_size_the_cache():
    config = EngineConfig(max_model_len=4096, kv_cache_memory=20.0)
    per_block = config.block_size * bytes_per_token(LLAMA_2_7B, BF16)
    by_memory = plan_capacity(config, LLAMA_2_7B, BF16, DeviceMemory(total=80 * GiB, in_use=0))
    assert by_memory.num_blocks == 20 * GiB // per_block  # the memory given, not the card's
    config.kv_capacity_tokens = 6144 + 1
    by_tokens = plan_capacity(config, LLAMA_2_7B, BF16)
    assert by_tokens.tokens == 6144 + config.block_size  # rounded up to whole blocks
    cpu_default = plan_capacity(EngineConfig(max_num_seqs=4, max_model_len=1000), LLAMA_2_7B, 4)
    assert cpu_default.num_blocks == 4 * -(-1000 // cpu_default.block_size)


def test_a_cache_asked_for_beyond_the_free_memory_is_refused():
    """--kv-capacity-tokens or --kv-cache-memory past what is free: on a card the allocation failed
    with the allocator's own message, on the CPU it filled the host until it ran out."""
    config = EngineConfig(max_model_len=4096, kv_cache_memory=30.0)
    with pytest.raises(ValueError, match="30.0 GiB, more than the 20.0 GiB of device memory available"):
        plan_capacity(config, LLAMA_2_7B, BF16, DeviceMemory(total=80 * GiB, in_use=60 * GiB))
    config = EngineConfig(max_model_len=4096, kv_capacity_tokens=10 ** 9)
    with pytest.raises(ValueError, match="of host memory available"):
        plan_capacity(config, LLAMA_2_7B, BF16, host_available=24 * GiB)
    fits = plan_capacity(EngineConfig(max_num_seqs=4, max_model_len=4096), LLAMA_2_7B, BF16, host_available=24 * GiB)
    assert fits.nbytes == 8 * GiB  # 4 x 4,096 tokens x 512 KiB


def test_a_cache_smaller_than_one_sequence_is_refused():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        plan_capacity(EngineConfig(max_model_len=4096, kv_capacity_tokens=4000), LLAMA_2_7B, BF16)
    with pytest.raises(ValueError, match="fewer than one sequence"):  # a card too small for the weights
        plan_capacity(EngineConfig(max_model_len=4096), LLAMA_2_7B, BF16, DeviceMemory(16 * GiB, 14 * GiB))
