# The README's two commands: `make install serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test lint fmt

install:
	bash scripts/install.sh

serve:
	$(BIN)/aligngate serve

test:
	$(BIN)/ruff check server tests
	$(BIN)/python -m pytest -v --durations=15

lint:
	$(BIN)/ruff check server tests

fmt:
	$(BIN)/ruff format server tests
