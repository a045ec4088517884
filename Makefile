# moeserve developer commands. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint run fixtures clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/moeserve serve $(ARGS)

# Regenerates the golden fixtures with the reference implementations (needs the dev extra).
fixtures: $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python tests/fixtures/make_fixtures.py
	$(BIN)/python tests/fixtures/gen_families.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
