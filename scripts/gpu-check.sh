#!/usr/bin/env bash
# The GPU path end to end, on a CUDA machine (not runnable on a CPU-only one):
#   1. install (the `gpu` target: vllm on CUDA)
#   2. plan and serve a two-engine models file on ONE GPU, LoRA on (aligngate check first)
#   3. answer through the official `openai` client, store judgments on the answers
#   4. one online CUT iteration trained on the GPU (the plan's training reserve), hot-loaded
#   5. make bench (raw vLLM vs the gateway; both multiprocess, as GPUs run)
# and print one summary. Usage: bash scripts/gpu-check.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-8765}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
nvidia-smi -L >/dev/null 2>&1 || { echo "gpu-check: no CUDA GPU answers nvidia-smi" >&2; exit 2; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
summary "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"

t0=$SECONDS
[[ -x .venv/bin/aligngate ]] || ALIGNGATE_TARGET=gpu bash scripts/install.sh > "$OUT/install.log" 2>&1
summary "install: $((SECONDS - t0)) s"
BIN=.venv/bin

cat > "$OUT/models.yaml" <<YAML
models:
  - name: chat-a
    path: builtin:smollm2-135m-instruct
    max_model_len: 4096
    store: true
    lora: {max_rank: 16, max_loras: 2}
  - name: chat-b
    path: builtin:smollm2-135m-instruct
    family: kto
    max_model_len: 4096
resources:
  training: {device: cuda:0}
YAML
$BIN/aligngate check --config "$OUT/models.yaml" | tee "$OUT/plan.txt"
summary "plan: $(grep -c '^| chat-' "$OUT/plan.txt") engines on one GPU; $(grep '^training:' "$OUT/plan.txt")"

export ALIGNGATE_ADAPTERS_DIR="$PWD/$OUT/adapters" ALIGNGATE_HOME="${ALIGNGATE_HOME:-$HOME/.cache/aligngate}"
export ALIGNGATE_DATABASE_URL="sqlite:///$PWD/$OUT/store.db"
mkdir -p "$ALIGNGATE_ADAPTERS_DIR"
t0=$SECONDS
$BIN/aligngate serve --config "$OUT/models.yaml" --host 127.0.0.1 --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $SERVER 2>/dev/null || { tail -50 "$OUT/serve.log"; exit 1; }
  sleep 1
done
summary "serve: ready in $((SECONDS - t0)) s"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | sed 's/^/gpu memory after start: /' | tee -a "$OUT/summary.txt"

$BIN/python - "$PORT" <<'PY' | tee -a "$OUT/summary.txt"
import sys, httpx
from openai import OpenAI
port = sys.argv[1]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
for model in ("chat-a", "chat-b"):
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    print(f"{model}: {r.choices[0].message.content!r}")
questions = [("What is the largest planet in the solar system?", "The answer must be Jupiter."),
             ("Who wrote Hamlet?", "Hamlet was written by Shakespeare."),
             ("What is 7 times 8?", "7 times 8 is 56.")]
for q, judgment in questions:
    r = client.chat.completions.create(model="chat-a", temperature=0, max_tokens=48,
        messages=[{"role": "user", "content": q}])
    httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json={"completion_id": r.id,
        "judgment": judgment, "annotator": "gpu-check"}).raise_for_status()
print(f"judgments stored: {len(questions)}")
PY

t0=$SECONDS
$BIN/aligngate align --model chat-a --server "http://127.0.0.1:$PORT" --include-unreviewed \
  --epochs 2 --lr 1e-3 > "$OUT/align.json" 2> "$OUT/align.log"
summary "online CUT iteration on the GPU + hot-load: $((SECONDS - t0)) s; $($BIN/python -c "import json,sys; j=json.load(open('$OUT/align.json')); print(j['status'], j['adapter'], 'train', j['train'])")"
$BIN/python - "$PORT" <<'PY' | tee -a "$OUT/summary.txt"
import sys
from openai import OpenAI
client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
names = [m.id for m in client.models.list().data]
adapter = next(n for n in names if "-iter" in n)
r = client.chat.completions.create(model=adapter, temperature=0, max_tokens=32,
    messages=[{"role": "user", "content": "What is the largest planet in the solar system?"}])
print(f"{adapter} (hot-loaded): {r.choices[0].message.content!r}")
PY
kill -TERM $SERVER; wait $SERVER || true
trap - EXIT

t0=$SECONDS
make bench BIN=$BIN > "$OUT/bench.log" 2>&1 || true
summary "make bench: $((SECONDS - t0)) s"
for d in default latest multiprocess; do
  [[ -f loadtest/results/$d/results.md ]] && { summary "--- $d"; grep -A4 'aligngate / raw' loadtest/results/$d/results.md | tee -a "$OUT/summary.txt"; }
done
echo "summary in $OUT/summary.txt"
