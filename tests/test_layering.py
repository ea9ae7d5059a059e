"""The HTTP server's modules import no torch (DESIGN.md: the server validates, tokenizes and streams;
tensors are the engine's): importing every module of server/ leaves torch unloaded, so a route's
import of an engine name (an error class, say) cannot pull the engine's libraries into it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_server_module_imports_torch():
    modules = sorted(f"server.{p.stem}" for p in (ROOT / "server").glob("*.py") if p.stem != "__main__")
    assert "server.app" in modules and "server.lora_api" in modules
    code = f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n" \
           "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
