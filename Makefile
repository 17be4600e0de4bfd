# The README's two commands: `make install serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test lint fmt docs bench bench-loop

install:
	bash scripts/install.sh

serve:
	$(BIN)/aligngate serve

test:
	$(BIN)/ruff check server tests loadtest docs
	$(BIN)/python -m pytest -v --durations=15

lint:
	$(BIN)/ruff check server tests loadtest docs

fmt:
	$(BIN)/ruff format server tests loadtest docs

# The documentation site (mkdocs.yml) into site/; browse: $(BIN)/mkdocs serve -a 127.0.0.1:8001
docs:
	$(BIN)/mkdocs build --strict

# The headline benchmark: raw vLLM and the gateway side by side on the default model, the
# identical workload against each, alternating rounds (results, tables, plots under
# loadtest/results/<row>/):
#   default       `aligngate serve` as the README runs it (LoRA on, storing on) vs raw vLLM
#                 with the same LoRA and length settings (4 rounds: the headline row)
#   strict        both without LoRA or storing, the same plain engine settings
#   multiprocess  the default row with both engine cores in their own processes (the GPU path)
# and start to ready: raw vLLM, `aligngate serve` with the preloaded and the spawned engine core.
BENCH := $(BIN)/python -m loadtest compare --concurrency 1,16 --max-tokens 128 --rounds 2
bench:
	$(BENCH) --setup default --rounds 4 --out loadtest/results/default
	$(BENCH) --setup strict --out loadtest/results/latest
	$(BENCH) --setup default --env VLLM_ENABLE_V1_MULTIPROCESSING=1 --out loadtest/results/multiprocess
	$(BIN)/python -m loadtest startup --rounds 3 --out loadtest/results/startup
	$(BENCH) --servers aligngate,aligngate-ray --out loadtest/results/ray

# Does the online loop make the model better? Each method's iterations against a checkable
# objective on held-out prompts, a random-judge null control, and the gate's power
# (results under loadtest/results/loop/; README "Does it get better?"). Run alone: ~90 min.
bench-loop:
	$(BIN)/python -m loadtest gate-power --json > loadtest/results/gate-power.json
	$(BIN)/python -m loadtest loop --out loadtest/results/loop
