#!/usr/bin/env bash
# The GPU checks in one run (a lent GPU machine's time is short): the CUDA tests, the per-op round
# trip with the executor on the GPU (GPU client: CUDA IPC buffers; CPU client: pinned shared memory),
# then the benchmarks on an 834M-parameter random Llama (hidden 2048, 16 layers) in bfloat16, issue
# 14's (split overhead in-process and through the server, executor efficiency) first. Results go to $OUT (default
# bench/results/gpu): log.txt and gpu-results.tar.gz, re-packed after every step so that a run cut
# short still returns what finished. Each step has its own time cap.
# BUDGET_S (default 560, under the device tool's 600 s per command) caps the whole run: a step whose
# cap no longer fits is skipped (logged), so the run always ends in time; STEPS="a b" runs only the
# named steps (name `model` with any benchmark step), e.g. the rest in a second call.
#   bash bench/gpu.sh                      # on a CUDA machine with the project's packages
#   STEPS="tests_quantized model multi_adapter_decode coserve capacity_bf16 capacity_4bit" bash bench/gpu.sh
#   SMOKE=1 DEVICE=cpu bash bench/gpu.sh   # proves the script runs, measures nothing
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
RESULTS=$OUT/results
mkdir -p "$RESULTS"
# transformers >= 5.25 swaps in Hugging Face Hub kernels on CUDA by default; the GPU machine is offline
# (and the equivalence tests compare against the plain modules), so they stay off.
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 USE_HUB_KERNELS=NO
LOG=$OUT/log.txt
SMOKE_ARGS=()
[ -n "${SMOKE:-}" ] && SMOKE_ARGS=(--smoke)

BUDGET_S=${BUDGET_S:-560}
STEPS=${STEPS:-}

step() {  # step NAME CAP_S COMMAND...: run with a time cap (within BUDGET_S), log it, re-pack the results
    local name=$1 cap=$2
    shift 2
    if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
    if (( SECONDS + cap > BUDGET_S )); then
        echo "=== $name: skipped, its cap of ${cap}s does not fit the ${BUDGET_S}s budget ($SECONDS s used)" | tee -a "$LOG"
        return 0
    fi
    echo "=== $name (cap ${cap}s) $(date +%T)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=5 "$cap" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0))s" | tee -a "$LOG"
    tar -czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" . 2>/dev/null
}

# the channels' polling receive (an optional C extension, transport/waiting.py): built in place here,
# since the working tree arrives without build outputs; without a compiler channels block instead
python3 setup.py -q build_ext --inplace >>"$LOG" 2>&1 || echo "(no C extension: channels block without polling)" >>"$LOG"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1

step tests 150 python3 -m pytest -q -p no:cacheprovider tests/symbiosis/test_gpu.py tests/symbiosis/client/test_client_model.py -k "gpu or devices" -rs

step serving_tests 120 python3 -m pytest -q -p no:cacheprovider tests/symbiosis/serving/test_engine.py -k cuda -rs

# the per-op round trip with the executor on the GPU: a GPU client (CUDA IPC buffers), a CPU client (pinned shared memory)
ITERATIONS=1000
[ -n "${SMOKE:-}" ] && ITERATIONS=40
step transport_gpu_client 55 python3 -m bench.transport --device "$DEVICE" --client-device "$DEVICE" --iterations $ITERATIONS --rounds 3 --out "$RESULTS/transport_gpu_client"
step transport_cpu_client 55 python3 -m bench.transport --device "$DEVICE" --client-device cpu --iterations $ITERATIONS --rounds 3 --out "$RESULTS/transport_cpu_client"

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
step executor_efficiency 130 python3 -m bench.executor_efficiency "${COMMON[@]}" --out "$RESULTS/executor_efficiency" --clients 4 16 --duration 8 --repeats 20
step tests_quantized 90 python3 -m pytest -q -p no:cacheprovider tests/symbiosis/test_gpu_quantized.py -rs
step multi_adapter_decode 150 python3 -m bench.multi_adapter_decode "${COMMON[@]}" --out "$RESULTS/multi_adapter_decode" --no-vllm --k 16 --new-tokens 32 --budget-gib 100
step coserve 110 python3 -m bench.coserve "${COMMON[@]}" --out "$RESULTS/coserve" --duration 10 --rate 2
step serving 150 python3 -m bench.serving --device "$DEVICE" --dtype "$DTYPE" "${SMOKE_ARGS[@]}" --out "$RESULTS/serving" --no-vllm --scenarios lora4 mixed --clients 16 64 --duration 10 --warmup 3
# capacity in device memory (budget: 16 GiB of the GPU): the base in bfloat16, then NF4 against QLoRA processes
CAPACITY=(--device "$DEVICE" "${MODEL_ARGS[@]}" "${SMOKE_ARGS[@]}" --budget-gib 16 --n 1 4 16 --duration 5 --batch 4 --seq-len 128 --threads 2)
step capacity_bf16 150 python3 -m bench.finetune_capacity "${CAPACITY[@]}" --base-dtype bfloat16 --out "$RESULTS/capacity_bf16"
step capacity_4bit 150 python3 -m bench.finetune_capacity "${CAPACITY[@]}" --base-dtype bfloat16 --quantize 4bit --out "$RESULTS/capacity_4bit"
step ray_cluster 150 python3 -m bench.ray_cluster "${COMMON[@]}" --out "$RESULTS/ray_cluster" --iterations 300 --kills 2 --clients 8 --duration 10
rm -rf "$MODEL"
tar -czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" .
echo "=== done $(date +%T)" | tee -a "$LOG"
