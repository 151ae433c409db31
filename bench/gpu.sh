#!/usr/bin/env bash
# The GPU checks in one run (a lent GPU machine's time is short): the CUDA tests, then the
# benchmarks on an 834M-parameter random Llama (hidden 2048, 16 layers) in bfloat16. Results go to $OUT (default
# bench/results/gpu): log.txt and gpu-results.tar.gz, re-packed after every step so that a run cut
# short still returns what finished. Each step has its own time cap.
#   bash bench/gpu.sh                      # on a CUDA machine with the project's packages
#   SMOKE=1 DEVICE=cpu bash bench/gpu.sh   # proves the script runs, measures nothing
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
RESULTS=$OUT/results
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
LOG=$OUT/log.txt
SMOKE_ARGS=()
[ -n "${SMOKE:-}" ] && SMOKE_ARGS=(--smoke)

step() {  # step NAME CAP_S COMMAND...: run with a time cap, log it, re-pack the results
    local name=$1 cap=$2
    shift 2
    echo "=== $name (cap ${cap}s) $(date +%T)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=5 "$cap" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0))s" | tee -a "$LOG"
    tar -czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" . 2>/dev/null
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1

step tests 120 python3 -m pytest -q -p no:cacheprovider tests/symbiosis/test_gpu.py tests/symbiosis/client/test_client_model.py -k "gpu or devices" -rs
step tests_quantized 90 python3 -m pytest -q -p no:cacheprovider tests/symbiosis/test_gpu_quantized.py -rs

MODEL=${TMPDIR:-/tmp}/symbiosis-gpu-model
if [ -n "${SMOKE:-}" ]; then MODEL_ARGS=(); else
    step model 60 python3 -c "
import torch, sys
from symbiosis.tiny import llama_config, save_random_model
save_random_model(llama_config(hidden_size=2048, num_hidden_layers=16, vocab_size=32000), sys.argv[1], dtype=torch.bfloat16)
" "$MODEL"
    MODEL_ARGS=(--model-dir "$MODEL")
fi
COMMON=(--device "$DEVICE" --dtype "$DTYPE" "${MODEL_ARGS[@]}" "${SMOKE_ARGS[@]}")
step split_overhead 100 python3 -m bench.split_overhead "${COMMON[@]}" --out "$RESULTS/split_overhead" --rounds 3 --steps 2 --batch 8 --seq-len 256 --new-tokens 32
step multi_adapter_decode 150 python3 -m bench.multi_adapter_decode "${COMMON[@]}" --out "$RESULTS/multi_adapter_decode" --no-vllm --k 16 --new-tokens 32 --budget-gib 100
step coserve 110 python3 -m bench.coserve "${COMMON[@]}" --out "$RESULTS/coserve" --duration 10 --rate 2
step executor_efficiency 70 python3 -m bench.executor_efficiency "${COMMON[@]}" --out "$RESULTS/executor_efficiency" --clients 4 16 --duration 8 --repeats 20
# capacity in device memory (budget: 16 GiB of the GPU): the base in bfloat16, then NF4 against QLoRA processes
CAPACITY=(--device "$DEVICE" "${MODEL_ARGS[@]}" "${SMOKE_ARGS[@]}" --budget-gib 16 --n 1 4 16 --duration 5 --batch 4 --seq-len 128 --threads 2)
step capacity_bf16 150 python3 -m bench.finetune_capacity "${CAPACITY[@]}" --base-dtype bfloat16 --out "$RESULTS/capacity_bf16"
step capacity_4bit 150 python3 -m bench.finetune_capacity "${CAPACITY[@]}" --base-dtype bfloat16 --quantize 4bit --out "$RESULTS/capacity_4bit"
step ray_cluster 150 python3 -m bench.ray_cluster "${COMMON[@]}" --out "$RESULTS/ray_cluster" --iterations 300 --kills 2 --clients 8 --duration 10
rm -rf "$MODEL"
tar -czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" .
echo "=== done $(date +%T)" | tee -a "$LOG"
