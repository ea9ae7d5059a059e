"""Shared fixtures: the real embedded model, loaded once per session, in-process and as a server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

# Without CUDA the Triton kernels (engine/backends/cuda) are tested under Triton's interpreter on
# the CPU. @triton.jit reads TRITON_INTERPRET when a kernel, or triton's own library, is defined,
# so it is set here, before any test imports triton (importing transformers' models does).
# CUDA hosts run those tests compiled, on the device (tests/kernel_device.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The C++ kernels are built once for the whole session (a minute on a slow 2-core host), whatever
# model cache a test's engine or server uses: they are kept where the default cache keeps them.
os.environ.setdefault("SKIPSERVE_NATIVE_CACHE", str(Path(os.environ.get("SKIPSERVE_CACHE")
                                                         or Path.home() / ".cache" / "skipserve") / "native"))

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
STARTUP_TIMEOUT_S = 300  # the very first start converts the GGUF (~30 s); later ones take seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `skipserve` process on loopback."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (ROOT / ".pytest_cache").mkdir(exist_ok=True)
        self.log_path = ROOT / f".pytest_cache/server-{self.port}.log"
        self.log = open(self.log_path, "w")
        # On CUDA a server's KV cache takes what 90% of the card leaves, counting other processes'
        # memory as in use: beside the session's server every other one would get no blocks. Each
        # test server on the GPU gets a fixed 1 GiB instead, unless the test sizes the cache itself.
        own_sizing = {"--device", "--kv-capacity-tokens", "--kv-cache-memory", "--gpu-memory-utilization"} & set(args)
        sizing = ["--kv-cache-memory", "1"] if cuda_available() and not own_sizing else []
        cmd = [sys.executable, "-m", "server.cli", "--port", str(self.port), "--log-level", "info", *sizing, *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_healthy()

    def wait_healthy(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server did not become healthy{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        """The end of the server's log, for a failure's message (a CUDA host's logs stay there)."""
        self.log.flush()
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "; its log ends:\n" + "\n".join(tail) if tail else ""

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        key = f"skipserve:{name}{labels}"
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        raise KeyError(key)

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# What only the CPU path promises: its kernels sum every output in one order for any batch, and the
# engine's fp32 weights are HF's. On CUDA the server (device auto) runs bf16 cuBLAS GEMMs, whose
# split of a reduction depends on the batch size, so a row's last bits (and a near-tie greedy
# token) may change with its neighbours; tests/test_cuda.py checks that path with tolerances.
cpu_path_only = pytest.mark.skipif(cuda_available(), reason="the server runs on CUDA here (bf16, not batch "
                                   "invariant); this property belongs to the CPU path")


@pytest.fixture(scope="session")
def server():
    srv = ServerProcess("--skip-max-budget", "0.5", "--header-timeout", "3", "--body-timeout", "3")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def engine():
    from engine.llm_engine import LLMEngine
    from server.config_file import load_config, preset_path

    config = load_config(preset_path(MODEL))
    config.device = "cpu"  # the CPU path, compared bit for bit with HF's fp32 model (CUDA: tests/test_cuda.py)
    config.max_num_seqs = 8
    config.max_model_len = 1024
    config.dtype = "float32"  # the GGUF dequantized, as HF loads it (tests/test_quantized_model.py: as served)
    return LLMEngine(config)


@pytest.fixture(scope="session")
def paged_engine(engine):
    """6,144 KV tokens for sequences of up to 2,048: three sequences' worth at max_model_len."""
    from tests.helpers import engine_like

    return engine_like(engine, kv_capacity_tokens=6144, max_model_len=2048, max_num_seqs=32)


@pytest.fixture(scope="session")
def hf_model(engine):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(engine.hf_dir), dtype=torch.float32).eval()


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in two sentences.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="session")
def chat_prompts(engine):
    return [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
