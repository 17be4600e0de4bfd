#!/usr/bin/env bash
# vLLM's own `bench serve` client (python -m loadtest.vllm_bench) against the default
# configuration: `aligngate serve` as `make serve` runs it vs raw vLLM with the same LoRA and
# length settings, random 256-token prompts -> 128 tokens, concurrency 16 and 1.
set -u
cd "$(dirname "$0")/.."
MODEL_DIR=$(.venv/bin/python -m server.cli default-model 2>/dev/null | tail -1)
OUT=loadtest/results/vllm-client; mkdir -p $OUT
export VLLM_CPU_KVCACHE_SPACE=2 VLLM_ENABLE_V1_MULTIPROCESSING=0
run_client() {  # label port
  for c in 16 1; do
    n=$([ $c = 16 ] && echo 96 || echo 12)
    .venv/bin/python -m loadtest.vllm_bench --backend openai-chat --endpoint /v1/chat/completions \
      --base-url http://127.0.0.1:$2 --model smollm2-135m-instruct --tokenizer "$MODEL_DIR" \
      --dataset-name random --random-input-len 256 --random-output-len 128 --ignore-eos \
      --num-prompts $n --max-concurrency $c --seed 0 --disable-tqdm \
      --save-result --result-dir $OUT --result-filename "$1-c$c.json" > $OUT/$1-c$c.txt 2>&1
    grep -E 'Output token throughput|Median TTFT|Median TPOT' $OUT/$1-c$c.txt | sed "s/^/$1 c=$c: /"
  done
}
wait_ready() { until curl -sf http://127.0.0.1:$1/v1/models >/dev/null; do sleep 0.5; done; }
# the gateway as `make serve` runs it (store into a scratch database)
ALIGNGATE_DATABASE_URL=sqlite:///$PWD/$OUT/store.db .venv/bin/python -m server.cli serve --port 18091 > $OUT/aligngate.log 2>&1 &
P=$!; wait_ready 18091; run_client aligngate 18091; kill -TERM $P; wait $P
.venv/bin/python -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name smollm2-135m-instruct \
  --host 127.0.0.1 --port 18092 --max-model-len 8192 --seed 0 --enforce-eager --disable-log-stats \
  --disable-uvicorn-access-log --enable-lora --max-lora-rank 16 --max-loras 2 --max-cpu-loras 8 > $OUT/raw-vllm.log 2>&1 &
P=$!; wait_ready 18092; run_client raw-vllm 18092; kill -TERM $P; wait $P
