# The two commands of the README: `make serve` and `make test`.
# set on make's command line (`make serve PORT=9000`); `:=`, not `?=`: a HOST or PORT that the shell
# or a platform exports does not move the server
VENV := .venv
HOST := 127.0.0.1
PORT := 8000

.PHONY: setup setup-test serve test

setup:
	@SKIPSERVE_VENV=$(VENV) bash scripts/setup.sh

setup-test:
	@SKIPSERVE_VENV=$(VENV) bash scripts/setup.sh test

# HOST and PORT reach the server as its defaults, so `ARGS="--port 9000"` overrides them cleanly
serve: setup
	SKIPSERVE_HOST=$(HOST) SKIPSERVE_PORT=$(PORT) $(VENV)/bin/skipserve $(ARGS)

test: setup-test
	$(VENV)/bin/python -m pytest tests $(ARGS)
