"""The CUDA backend. Llama-family, Qwen3, Gemma 2/3 and the mixtures of experts (Qwen3-MoE,
Mixtral, gpt-oss) with dense weights decode through a step on Triton kernels with the FFN skip decided on
the device, captured as CUDA graphs per batch bucket (decode_step.py, graphs.py). Prefill, and the
decode steps that step does not take, run the torch backend's ops (cuBLAS GEMMs, SDPA prefill)
with the Triton paged decode attention, which reads K/V in place."""
from __future__ import annotations

import importlib.util
import logging

import torch

from engine.backends.torch_backend import TorchBackend
from engine.kv.block_manager import blocks_for

log = logging.getLogger("skipserve.cuda")


class CUDABackend(TorchBackend):
    name = "cuda"
    causal_prefill = True

    def __init__(self):
        # torch's CUDA wheels bring triton; without it, or where its kernels cannot launch, every op
        # is the torch backend's
        self.triton = importlib.util.find_spec("triton") is not None and _triton_launches()
        self.decode_reads_kv_in_place = self.triton  # the Triton paged decode attention, every model

    def prepare(self, model) -> None:
        """A mixture's dense experts into one tensor per projection, as the decode step's routed
        expert kernels read them (masked_moe.py); the copies they leave go back to the driver, so
        that the KV cache is sized from what is really free."""
        if not self.triton or not any(getattr(layer, "experts", None) for layer in model.layers):
            return
        from engine.backends.cuda.masked_moe import stack_model_experts

        stack_model_experts(model)
        torch.cuda.empty_cache()

    def decode_step(self, model, kv, config, policy):
        if not self.triton:
            log.warning("triton is not installed: decode steps run on the torch path")
            return None
        from engine.backends.cuda.decode_step import DecodeStep

        if not DecodeStep.fits(model, kv):
            log.info("decode steps run on the torch path: the Triton decode step takes Llama, Qwen3, Gemma, "
                     "Qwen3-MoE, Mixtral and gpt-oss layers with dense weights in the activations' dtype "
                     "(this model: %s layers)", model.layers[0].kind)
            return None
        step = DecodeStep(model, kv, config.max_num_seqs, blocks_for(config.max_model_len, kv.block_size),
                               config.skip, policy.quorum, policy.may_skip)
        with torch.inference_mode():
            step.tune()  # the masked FFN kernels' tiles for this card, logged beside cuBLAS
        if config.enforce_eager:
            log.info("decode steps run the Triton kernels eagerly (--enforce-eager: no CUDA graphs)")
        else:
            with torch.inference_mode():  # as every forward of the runner
                step.graphs.capture()  # logs time and memory; on failure a warning, and eager steps
        return step

    def attention(self, q, k, v, k_cache, v_cache, meta, scale, window, softcap=None, sinks=None):
        if meta.is_prefill or not self.triton:
            return super().attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap, sinks)
        from engine.backends.cuda.decode_attention import paged_decode_attention
        from engine.backends.cuda.write_kv import write_kv

        write_kv(k, v, k_cache, v_cache, meta.write_blocks * meta.block_size + meta.write_offsets)
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, window,
                                      softcap=softcap, sinks=sinks)


def _triton_launches() -> bool:
    """Whether a Triton kernel compiles and runs on the current device: its first launch builds
    Triton's C launcher, which needs a C compiler and Python's headers on the host (an image
    without them fails there, at the first step)."""
    try:
        from engine.backends.cuda.write_kv import write_kv

        k = torch.ones(1, 1, 16, device="cuda")
        k_cache, v_cache = torch.zeros(2, 1, 1, 1, 16, device="cuda")
        write_kv(k, k, k_cache, v_cache, torch.zeros(1, dtype=torch.int32, device="cuda"))
        if not torch.equal(k_cache.view(-1), k.view(-1)):
            raise RuntimeError("a test write of K/V read back wrong")
    except Exception as exc:
        log.warning("Triton kernels do not run here (%s: %s): every op runs on the torch path", type(exc).__name__, exc)
        return False
    return True


__all__ = ["CUDABackend"]
