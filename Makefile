# Trifecta: `make up` (install + run everything), `make test` (the suite), `make chaos` (slow fault tests)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test chaos lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[worker,torch,dev]'
	$(BIN)/trifecta models fetch textmask
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/trifecta up

test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

chaos: install
	$(BIN)/python -m pytest -q -m slow tests

lint: install
	$(BIN)/ruff check api tasks workers storage client tests

bench: install
	$(BIN)/trifecta bench

clean:
	rm -rf $(VENV) run data bench.json bench.png
