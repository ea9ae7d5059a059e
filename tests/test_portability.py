"""What an AVX2-only host runs (no AVX-512, no AVX512-BF16), emulated on any x86-64 host that has
AVX2 + FMA: the kernels built for x86-64-v3, oneDNN and ATen capped at AVX2. bf16 weights load and
serve there (they used to fail to load: oneDNN's bf16 path needs AVX-512)."""
from __future__ import annotations

import platform

import openai
import pytest

from tests.conftest import ServerProcess

AVX2_HOST = {"SKIPSERVE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(platform.machine() != "x86_64" or not {"avx2", "fma", "f16c"} <= cpu_flags(),
                    reason="emulating an AVX2 host needs an x86-64 CPU with AVX2, FMA and F16C")
def test_bf16_serves_on_an_avx2_host():
    # the CPU path: with device auto a CUDA host would serve on the GPU, where no native kernel loads
    srv = ServerProcess("--device", "cpu", "--dtype", "bfloat16", "--max-batch", "4", "--max-model-len", "512",
                        env=AVX2_HOST)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
    finally:
        assert srv.stop() == 0
    log = srv.log_path.read_text()
    assert "native CPU kernels (avx2)" in log and "bfloat16 weights" in log
