"""Evaluation every `eval_steps` optimizer steps: eval_* keys in metrics.jsonl at the right steps, and the
training run itself unchanged by it (the evaluation restores the RNG state)."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import _assert_same_weights, _config

from conftest import free_port
from hypo.config import HyPOConfig
from hypo.training.trainer import train


def _records(result) -> list[dict]:
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_periodic_evaluation_logs_eval_keys_and_leaves_training_unchanged(tiny_model_dir, tiny_task, tmp_path):
    plain = train(_config(tiny_model_dir, tiny_task, tmp_path, "plain", max_steps=3, eval_at_end=False))
    evaluated = train(_config(tiny_model_dir, tiny_task, tmp_path, "periodic", max_steps=3, eval_at_end=False,
                              eval_steps=1, eval_max_prompts_during_training=2, save_steps=1))
    records = _records(evaluated)
    evals = [r for r in records if "eval_objective/kl" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]  # no final evaluation: the last step is evaluated here
    assert all(r["eval_num_prompts"] == 2 for r in evals)
    # the evaluation at step 2 is the evaluation of the model after step 2 (its checkpoint), same seed
    direct = _evaluate_saved(evaluated.output_dir / "checkpoint-2", tiny_model_dir, tiny_task, evaluated)
    assert evals[1]["eval_objective/kl"] == pytest.approx(direct["objective/kl"], abs=1e-5)
    assert evals[1]["eval_win_rate"] == direct["win_rate"] and evals[1]["eval_objective/kl"] != 0
    train_plain = [r for r in _records(plain) if "loss" in r]
    train_evaluated = [r for r in records if "loss" in r]
    assert [r["loss"] for r in train_plain] == [r["loss"] for r in train_evaluated]
    _assert_same_weights(plain.model_dir, evaluated.model_dir, atol=0)


def _evaluate_saved(model_dir, reference_dir, tiny_task, result) -> dict:
    from hypo.data.encoding import load_prompt_data
    from hypo.evaluation.held_out import evaluate_policy
    from hypo.models.loading import load_causal_lm, load_tokenizer
    from hypo.models.reference import Reference

    config = json.loads((result.output_dir / "config.json").read_text())
    tokenizer = load_tokenizer(str(model_dir))
    prompts, _ = load_prompt_data(str(tiny_task["eval_prompts"]), tokenizer, max_prompt_length=config["max_prompt_length"])
    return evaluate_policy(load_causal_lm(str(model_dir)), Reference(load_causal_lm(str(reference_dir))), tokenizer,
                           prompts[:2], judge="review-sentiment", num_samples=config["eval_num_samples"],
                           max_new_tokens=config["max_completion_length"], batch_size=config["eval_batch_size"],
                           seed=config["seed"])["metrics"]


def test_final_evaluation_is_not_repeated_at_the_last_step(tiny_model_dir, tiny_task, tmp_path):
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "both", method="dpo", max_steps=2, eval_steps=1))
    evals = [r for r in _records(result) if "eval_objective/kl" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert evals[-1]["eval_num_prompts"] == 2  # the final one, with eval_max_prompts (FAST: 2)
    assert evals[-1]["eval_win_rate"] == result.eval["metrics"]["win_rate"]


def test_evaluate_policy_restores_the_rng_state(tiny_model_dir, tiny_task):
    from hypo.data.encoding import load_prompt_data
    from hypo.evaluation.held_out import evaluate_policy
    from hypo.models.loading import load_causal_lm, load_tokenizer
    from hypo.models.reference import Reference

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts, _ = load_prompt_data(str(tiny_task["eval_prompts"]), tokenizer)
    model, reference = load_causal_lm(str(tiny_model_dir)), Reference(load_causal_lm(str(tiny_model_dir)))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_policy(model, reference, tokenizer, prompts[:1], judge=None, num_samples=2, max_new_tokens=3,
                    batch_size=1, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_eval_steps_must_not_be_negative():
    with pytest.raises(ValueError, match="eval_steps"):
        HyPOConfig(eval_steps=-1)


@pytest.mark.slow
def test_periodic_evaluation_under_two_processes(tiny_model_dir, tiny_task, tmp_path):
    """The main process evaluates while the other waits; metrics are written once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", "-m", "hypo.cli", "train", "--model_name_or_path", str(tiny_model_dir),
        "--dataset", str(tiny_task["pairs"]), "--prompts", str(tiny_task["prompts"]),
        "--eval_prompts", str(tiny_task["eval_prompts"]), "--judge", "review-sentiment", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--per_device_prompt_batch_size", "2", "--max_completion_length", "6",
        "--eval_max_prompts", "2", "--eval_steps", "1", "--eval_max_prompts_during_training", "2",
        "--output_dir", str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_objective/kl" in r] == [1, 2]  # periodic at 1, final at 2
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
