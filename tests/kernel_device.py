"""Where the Triton kernel tests run: compiled on the CUDA device where there is one, else on the
CPU under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before triton is imported).
Import it first in a kernel test module: it skips the module where neither works."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set (conftest.py sets it)", allow_module_level=True)


def _version(module) -> tuple[int, int]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


if INTERPRETED:
    import numpy
    import triton

    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4):
        # what a CUDA machine's torch pins (3.6) may meet here; compiled on a GPU its kernels are fine
        pytest.skip(f"triton {triton.__version__}'s interpreter turns a loaded scalar into an index through a "
                    f"call numpy {numpy.__version__} refuses: triton 3.7 or newer interprets these kernels",
                    allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")


def poisoned(*shape, dtype) -> torch.Tensor:
    """An output buffer full of NaN: whatever a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
