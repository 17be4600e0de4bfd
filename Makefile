# The README's two commands: `make install serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test lint fmt bench

install:
	bash scripts/install.sh

serve:
	$(BIN)/aligngate serve

test:
	$(BIN)/ruff check server tests loadtest
	$(BIN)/python -m pytest -v --durations=15

lint:
	$(BIN)/ruff check server tests loadtest

fmt:
	$(BIN)/ruff format server tests loadtest

# The headline benchmark: raw vLLM and the gateway side by side on the default model
# (results, table and plots under loadtest/results/latest/), then the same with both engine
# cores in their own processes, the path GPUs run (loadtest/results/multiprocess/).
bench:
	$(BIN)/python -m loadtest compare --concurrency 1,16 --max-tokens 128 --rounds 2 --out loadtest/results/latest
	$(BIN)/python -m loadtest compare --concurrency 1,16 --max-tokens 128 --rounds 2 \
	  --env VLLM_ENABLE_V1_MULTIPROCESSING=1 --out loadtest/results/multiprocess
