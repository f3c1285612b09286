"""The KL budget (`target_kl`): the rule and its report in numbers, the option checks before anything loads, and a
run that passes the budget: it stops at the first evaluation beyond it and its final model is the last evaluated
state within it (the weights of that step's checkpoint in a run without the budget)."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import _config, _weights

from hypo.config import HyPOConfig
from hypo.training.kl_budget import KLBudget
from hypo.training.trainer import train


def test_within_adds_the_margin_in_standard_errors():
    """target 0.5, margin 2: 0.40 +- 0.04 -> 0.48 within; 0.40 +- 0.06 -> 0.52 beyond; margin 0: both within."""
    strict, plain = KLBudget(0.5, margin=2.0), KLBudget(0.5)
    assert strict.within(0.40, 0.04) and not strict.within(0.40, 0.06)
    assert plain.within(0.40, 0.06) and plain.within(0.5, 1.0) and not plain.within(0.5001, 0.0)


def test_record_keeps_the_last_state_within_and_reports_why_it_stopped():
    budget = KLBudget(0.5, margin=1.0)
    assert budget.record(0, None, None) and budget.kept_step == 0  # the reference itself: KL 0
    assert budget.record(10, 0.30, 0.05) and budget.record(20, 0.42, 0.07)
    assert not budget.record(30, 0.47, 0.06)  # 0.47 + 0.06 = 0.53 > 0.5
    assert (budget.kept_step, budget.kept_kl, budget.stop_step, budget.exceeded) == (20, 0.42, 30, True)
    assert budget.summary() == ("stopped at step 30: held-out KL 0.470 +- 0.060 nats is beyond target_kl 0.5 with a "
                                "margin of 1 standard errors; the final model is the state after step 20 (held-out "
                                "KL 0.420 +- 0.070 nats)")
    assert budget.metrics() == {"kl_budget/target_kl": 0.5, "kl_budget/kept_step": 20.0, "kl_budget/stopped": 1.0,
                                "kl_budget/stop_step": 30.0, "kl_budget/stop_kl": 0.47}
    restored = KLBudget(0.5)
    restored.load_state_dict(budget.state_dict())
    assert restored == budget


@pytest.mark.parametrize(("options", "message"), [
    ({"target_kl": 0.5}, "set eval_steps"),
    ({"target_kl": 0.0, "eval_steps": 5}, "target_kl must be > 0"),
    ({"target_kl": 0.5, "eval_steps": 5, "target_kl_margin": -1.0}, "target_kl_margin must be >= 0"),
])
def test_option_combinations_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        HyPOConfig(**options)


def _records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


FAST_MOVING = {"learning_rate": 0.1, "lr_scheduler_type": "constant", "warmup_ratio": 0.0}
"""A learning rate at which the tiny model's held-out KL grows clearly from step to step (about 0.3, 14, 22-27
nats at steps 1-3); at 1e-3 with a decaying rate its estimates stay within their noise, sometimes below 0."""


@pytest.mark.parametrize("method", ["dpo", pytest.param("hypo", marks=pytest.mark.slow)])
def test_a_run_past_the_budget_keeps_the_last_state_within_it(tiny_model_dir, tiny_task, tmp_path, method):
    common = {"method": method, "max_steps": 4, "eval_steps": 1, "eval_max_prompts_during_training": 4,
              "eval_at_end": False, **FAST_MOVING}
    free = train(_config(tiny_model_dir, tiny_task, tmp_path, "free", save_steps=1, **common))
    kls = {r["step"]: r["eval_objective/kl"] for r in _records(free.output_dir) if "eval_objective/kl" in r}
    budget = (kls[2] + kls[3]) / 2
    assert kls[1] < budget and kls[2] < budget < kls[3]  # the premise: steps 1 and 2 within, step 3 beyond
    run = train(_config(tiny_model_dir, tiny_task, tmp_path, "budget", target_kl=budget, **common))
    assert run.steps == 3 and run.kept_step == 2
    assert "stopped at step 3" in run.stopped_early and "the final model is the state after step 2" in run.stopped_early
    final, expected = _weights(run.model_dir), _weights(free.output_dir / "checkpoint-2")
    assert all(torch.equal(final[k], expected[k]) for k in final)
    records = _records(run.output_dir)
    assert {r["step"]: r["eval_objective/kl"] for r in records if "eval_objective/kl" in r} == \
        {step: kls[step] for step in (1, 2, 3)}  # the same estimates as the run without a budget
    assert records[-1]["kl_budget/kept_step"] == 2 and records[-1]["kl_budget/stop_step"] == 3
    assert sorted(p.name for p in run.output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "the final model is the state after step 2" in (run.model_dir / "README.md").read_text()


def test_a_budget_passed_at_the_first_evaluation_keeps_the_initial_model(tiny_model_dir, tiny_task, tmp_path):
    run = train(_config(tiny_model_dir, tiny_task, tmp_path, "tight", method="dpo", max_steps=4, eval_steps=2,
                        target_kl=1.0, **FAST_MOVING))
    assert (run.steps, run.kept_step) == (2, 0) and "the initial model (step 0)" in run.stopped_early
    final, initial = _weights(run.model_dir), _weights(tiny_model_dir)
    assert all(torch.equal(final[k], initial[k]) for k in final)
    assert run.eval["metrics"]["objective/kl"] == 0.0  # the final evaluation is the kept state's


def test_a_budget_needs_held_out_prompts_before_anything_loads(tiny_model_dir, tiny_task, tmp_path):
    config = _config(tiny_model_dir, tiny_task, tmp_path, "none", target_kl=0.5, eval_steps=1)
    no_prompts = HyPOConfig(**{**config.to_dict(), "eval_prompts": None})
    with pytest.raises(ValueError, match="target_kl is measured on held-out prompts"):
        train(no_prompts)
    assert not (tmp_path / "none").exists()


def test_sharded_runs_are_refused_before_any_model_loads():
    from types import SimpleNamespace

    from hypo.training.setup import check_kl_budget_support

    config = HyPOConfig(target_kl=0.5, eval_steps=5)
    fsdp2 = SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(deepspeed_plugin=None))
    zero3 = SimpleNamespace(is_fsdp2=False, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    zero2 = SimpleNamespace(is_fsdp2=False, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    for accelerator in (fsdp2, zero3):
        with pytest.raises(ValueError, match="target_kl is not supported with sharded training"):
            check_kl_budget_support(accelerator, config)
    check_kl_budget_support(zero2, config)
    check_kl_budget_support(fsdp2, HyPOConfig())  # no budget: nothing to refuse
