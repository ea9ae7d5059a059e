"""The CUDA backend: the torch backend's ops (cuBLAS GEMMs, SDPA prefill) for prefill and for
models without a decode step here, and for Llama-family models a decode step on Triton kernels
with the FFN skip decided on the device, captured as CUDA graphs per batch bucket
(decode_step.py, graphs.py)."""
from __future__ import annotations

import logging

from engine.backends.torch_backend import TorchBackend
from engine.kv.block_manager import blocks_for

log = logging.getLogger("skipserve.cuda")


class CUDABackend(TorchBackend):
    name = "cuda"

    def decode_step(self, model, kv, config, policy):
        from engine.backends.cuda.decode_step import LlamaDecodeStep

        if not LlamaDecodeStep.fits(model, kv):
            log.info("decode steps run on the torch path: the Triton decode step takes plain Llama layers "
                     "with dense weights (this model: %s layers)", model.layers[0].kind)
            return None
        step = LlamaDecodeStep(model, kv, config.max_num_seqs, blocks_for(config.max_model_len, kv.block_size),
                               config.skip, policy.quorum)
        if config.enforce_eager:
            log.info("decode steps run the Triton kernels eagerly (--enforce-eager: no CUDA graphs)")
        else:
            step.graphs.capture()  # logs time and memory; on failure a warning, and eager steps
        return step


__all__ = ["CUDABackend"]
