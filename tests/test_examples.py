"""The examples in docs/examples/ run as written, here on a tiny model."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def test_notebook_workflow_example(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Loads a model and Datasets, trains with HyPOTrainer and a callback, evaluates, saves and reloads."""
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["notebook_workflow.py", "--model", str(tiny_model_dir), "--output_dir", str(out),
                                      "--max_steps", "2", "--max_length", "96", "--max_completion_length", "8",
                                      "--eval_max_prompts", "4"])
    runpy.run_path(str(EXAMPLES / "notebook_workflow.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "step 1: loss 0.6931" in printed and "step 2: held-out KL" in printed  # the callback's on_log, on_evaluate
    assert "trained 2 steps" in printed and "'eval_num_prompts': 4" in printed
    saved = AutoModelForCausalLM.from_pretrained(out / "my-model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(saved.lm_head.weight, initial.lm_head.weight)  # it trained
    assert (out / "my-model" / "README.md").is_file()
