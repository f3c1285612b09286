#!/usr/bin/env bash
# Set up (once), then fine-tune the embedded SmolLM2-135M-Instruct with HyPO on the bundled task.
# Extra arguments go to `hypo train`, e.g. `--method dpo` or `--max_steps 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hypo train "$@"
