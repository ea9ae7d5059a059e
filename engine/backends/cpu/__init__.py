"""The CPU backend: skipserve's C++ kernels (engine/native) where they are built and apply, torch
(and oneDNN for the GEMMs) elsewhere; chosen once, when the backend is built."""
from engine.backends.cpu.backend import CPUBackend

__all__ = ["CPUBackend"]
