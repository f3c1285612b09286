#!/usr/bin/env bash
# Set up (once), then fine-tune the embedded SmolLM2-135M-Instruct with HyPO on the bundled task.
# Extra arguments go to `hypo train`, e.g. `--method dpo` or `--max_steps 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# glibc malloc settings that make CPU training 1.4-3x faster (read at process start).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
export MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-1073741824}
exec .venv/bin/hypo train "$@"
