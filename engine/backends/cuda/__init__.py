"""The CUDA backend. For now the torch backend's ops (cuBLAS GEMMs, SDPA prefill, a gathered
decode attention); CUDA graphs and Triton kernels that read the block tables in place come with
the CUDA fast path and replace ops here, one at a time, each tested against the torch reference."""
from engine.backends.torch_backend import TorchBackend


class CUDABackend(TorchBackend):
    name = "cuda"


__all__ = ["CUDABackend"]
