#!/usr/bin/env bash
# Set up (once), lint (ruff, and the package's import layers: .importlinter), then run the test suite (fast,
# offline, CPU). Slow tests: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests scripts
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest "$@"
