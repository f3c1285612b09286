"""Colocate mode for real: a vLLM engine inside the sampling process (vLLM's CPU build, in .venv-vllm's Python,
since it pins another transformers than hypo). Its samples' log-probs match our forward's, before and after a
weight push, and after the push they are the updated weights' (slow: the engine compiles the model)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hypo.sampling.vllm.process import server_environment, vllm_python

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("vllm_colocate_worker.py")


def test_colocated_engine_samples_the_policy_and_takes_its_weights():
    from hypo.models.loading import resolve_model_path

    python = vllm_python()
    if python is None:
        pytest.skip("no Python with vLLM: run scripts/setup-vllm-cpu.sh (or set HYPO_VLLM_PYTHON)")
    src = str(Path(__file__).parents[1] / "src")
    env = {**server_environment(), "PYTHONPATH": src}
    done = subprocess.run([str(python), str(WORKER), resolve_model_path(None)], capture_output=True, text=True,
                          timeout=1200, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout[-2000:] + done.stderr[-4000:])
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(result)
    assert result["rows"] == 8
    assert max(result["max_gap"]) < 1e-3  # per token, nats
    assert result["mean_gap_to_previous_weights"][0] > 20 * max(result["mean_gap"][1], 1e-5)
