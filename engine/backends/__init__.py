"""Device backends: the ops a model calls (linear layers, norms, rotary, paged attention) and the
fused decode paths, chosen once per device when the runner builds the model. Model code calls its
backend and never asks which device or kernel it runs on.

- `cpu/`: skipserve's C++ kernels (engine/native) where they apply, torch + oneDNN elsewhere;
- `cuda/`: Llama-family decode steps on Triton kernels and CUDA graphs, torch elsewhere;
- `torch_backend.py`: plain torch on any device, the reference the others are tested against.
"""
from __future__ import annotations

import torch


def select_backend(device: torch.device):
    if device.type == "cuda":
        from engine.backends.cuda import CUDABackend

        return CUDABackend()
    if device.type == "cpu":
        from engine.backends.cpu import CPUBackend

        return CPUBackend()
    from engine.backends.torch_backend import TorchBackend

    return TorchBackend()
