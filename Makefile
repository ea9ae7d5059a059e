# The two commands of the README: `make serve` and `make test`.
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test bench

setup:
	@bash scripts/setup.sh

serve: setup
	$(VENV)/bin/skipserve --host $(HOST) --port $(PORT) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest tests $(ARGS)
