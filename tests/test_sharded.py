"""Sharded training on 2 CPU processes (gloo) with FSDP2's `fully_shard`, the sharding accelerate applies
on GPUs: the collective save (full weights gathered to the main process), generation on gathered weights,
and the collective evaluation give the same model and evaluation as one unsharded process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

WORKER = Path(__file__).with_name("sharded_worker.py")


def _run(command: list[str], **env) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent), **env})
    assert done.returncode == 0, done.stderr[-4000:]


def test_fsdp2_sharded_training_saves_and_evaluates_like_one_process(tiny_model_dir, tiny_task, tmp_path):
    files = [str(tiny_model_dir), str(tiny_task["pairs"]), str(tiny_task["prompts"]), str(tiny_task["eval_prompts"])]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29547", str(WORKER), str(tmp_path / "sharded"),
          *files, "sharded"])
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), *files, "single"],
         MASTER_ADDR="127.0.0.1", MASTER_PORT="29548", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "model").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-5, msg=key)
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-3  # training moved the weights
    a = json.loads((tmp_path / "sharded" / "eval_results.json").read_text())["metrics"]
    b = json.loads((tmp_path / "single" / "eval_results.json").read_text())["metrics"]
    assert a["num_completions"] == b["num_completions"] == 4 and a["win_rate"] == b["win_rate"]
    assert abs(a["objective/kl"] - b["objective/kl"]) < 1e-4 and b["objective/kl"] != 0
