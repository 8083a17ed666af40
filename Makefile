# The two set-up commands of the README: `make serve` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test venv services lint openapi

# Serving needs the gateway and its MongoDB driver; the tests also need their tooling (pytest, stomp.py, ...).
$(BIN)/.installed-serve: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[mongodb]'
	touch $@

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[mongodb,test]'
	touch $@ $(BIN)/.installed-serve

venv: $(BIN)/.installed

# Flags for the gateway: make serve ARGS='--stomp-port 61614 --store memory://' (or STOMPGATE_* variables)
serve: $(BIN)/.installed-serve
	$(BIN)/stompgate serve $(ARGS)

# Installs what the tests need beyond Python (FerretDB, Chromium, the npm client), then runs the whole suite.
test: $(BIN)/.installed
	bash .ci/services.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider --cov=stomp_core --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=100

openapi: $(BIN)/.installed
	$(BIN)/stompgate openapi
