#!/usr/bin/env bash
# GPU measurements in one offline command: seconds per step of our DPO and HyPO next to TRL's DPOTrainer
# and RLOOTrainer (bf16 autocast, the same shapes), the step split, decoding step vs its weight-read floor,
# peak GPU memory, and the fraction of weights that change with float32 vs bfloat16 weights.
#
#   bash scripts/gpu-bench.sh                 # a randomly initialized 1.1B Llama (TinyLlama shape), no download
#   bash scripts/gpu-bench.sh /path/to/model  # any local causal LM folder
#
# Needs an environment with hypo, trl and a CUDA build of torch 2.13.0 (README, "Install"). Results go to
# bench/gpu/bench_results.{json,md}; extra arguments go to `hypo bench` (e.g. --measured_steps 10).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures a GPU')"
model=(--random_model 1b)
if [ $# -ge 1 ] && [ "${1#--}" = "$1" ]; then model=(--model_name_or_path "$1"); shift; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" -m hypo.cli bench "${model[@]}" --weights_changed --measured_steps 10 \
    --output bench/gpu/bench_results.json "$@"
