# The two commands of the README: `make serve` and `make test`.
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup setup-test serve test

setup:
	@bash scripts/setup.sh

setup-test:
	@bash scripts/setup.sh test

# HOST and PORT reach the server as its defaults, so `ARGS="--port 9000"` overrides them cleanly
serve: setup
	SKIPSERVE_HOST=$(HOST) SKIPSERVE_PORT=$(PORT) $(VENV)/bin/skipserve $(ARGS)

test: setup-test
	$(VENV)/bin/python -m pytest tests $(ARGS)
