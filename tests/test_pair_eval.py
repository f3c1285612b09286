"""Held-out pair metrics under TRL's names: the DPO loss and implicit rewards of held-out pairs, checked
against the formula applied to log-probs computed one pair at a time; and the held-out pairs of a config."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_model, write_jsonl
from hypo.config import HyPOConfig
from hypo.data.encoding import load_preference_data
from hypo.data.sources import load_training_data
from hypo.evaluation.pairs import PAIR_METRICS, evaluate_pairs, pair_metric_sums
from hypo.models.reference import Reference
from hypo.objective.logprobs import completion_logps
from hypo.training.steps import StepContext

PAIRS = [{"prompt": f"Write a short review of {item}.", "chosen": good, "rejected": bad}
         for item, good, bad in [("a cafe", "The coffee was excellent.", "Terrible."),
                                 ("a phone", "Wonderful, I enjoyed it.", "It broke after a week."),
                                 ("a hotel", "Lovely staff.", "Boring and slow, not good at all."),
                                 ("a book", "Highly recommended!", "A boring, slow and disappointing book."),
                                 ("a film", "A great and lovely film.", "It was fine, nothing special.")]]


def _context(policy, reference, tokenizer, share_prompt=True, **config) -> StepContext:
    return StepContext(policy=policy, sampler=policy, reference=Reference(reference), config=HyPOConfig(**config),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       share_prompt=share_prompt, ref_cache={})


@pytest.fixture(scope="module")
def items(tiny_tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "test.jsonl", PAIRS)
    return load_preference_data(str(path), tiny_tokenizer, max_length=64)[0]


def _one_by_one(policy, reference, items, beta):
    """The metrics from each pair's log-probs, computed alone, and the formulas of docs/design.md: the objective."""
    rows = []
    for item in items:
        prompt = torch.tensor([item["prompt_input_ids"]])
        logps = {}
        for name, model in (("policy", policy), ("ref", reference)):
            for side in ("chosen", "rejected"):
                completion = torch.tensor([item[f"{side}_input_ids"]])
                with torch.no_grad():
                    logps[name, side] = completion_logps(model, prompt, torch.ones_like(prompt), completion,
                                                         torch.ones_like(completion)).item()
        chosen_reward = beta * (logps["policy", "chosen"] - logps["ref", "chosen"])
        rejected_reward = beta * (logps["policy", "rejected"] - logps["ref", "rejected"])
        margin = chosen_reward - rejected_reward
        rows.append([-math.log(1 / (1 + math.exp(-margin))), chosen_reward, rejected_reward,
                     float(chosen_reward > rejected_reward), margin, logps["policy", "chosen"],
                     logps["policy", "rejected"]])
    return {name: sum(r[i] for r in rows) / len(rows) for i, name in enumerate(PAIR_METRICS)}


def test_policy_equal_to_reference_gives_log_2(tiny_tokenizer, items):
    model = build_model(tiny_tokenizer, seed=1)
    metrics = evaluate_pairs(_context(model, build_model(tiny_tokenizer, seed=1), tiny_tokenizer), items, batch_size=2)
    assert list(metrics) == list(PAIR_METRICS)
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert metrics["eval_rewards/accuracies"] == 0  # ties are not counted as correct (TRL: chosen > rejected)


@pytest.mark.parametrize(("batch_size", "share_prompt"), [(1, True), (2, False), (8, True)])
def test_metrics_equal_the_formulas_on_each_pair(tiny_tokenizer, items, batch_size, share_prompt):
    policy, reference = build_model(tiny_tokenizer, seed=2), build_model(tiny_tokenizer, seed=3)
    policy.train()  # evaluation switches to eval mode and back
    ctx = _context(policy, reference, tiny_tokenizer, share_prompt=share_prompt, beta=0.5)
    metrics = evaluate_pairs(ctx, items, batch_size=batch_size)
    expected = _one_by_one(policy, reference, items, beta=0.5)
    assert metrics == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert 0 < metrics["eval_rewards/accuracies"] < 1  # the pairs disagree: a real test of the counting
    assert policy.training


def test_eval_loss_is_the_configured_offline_loss(tiny_tokenizer, items):
    """With loss_type ipo, eval_loss is TRL's IPO on each pair's log-ratios per completion token:
    mean over pairs of ((c+ / |y+| - c- / |y-|) - 1 / (2 beta))^2, from log-probs computed one pair at a time."""
    policy, reference = build_model(tiny_tokenizer, seed=2), build_model(tiny_tokenizer, seed=3)
    metrics = evaluate_pairs(_context(policy, reference, tiny_tokenizer, beta=0.5, loss_type="ipo"), items,
                             batch_size=2)
    expected = []
    for item in items:
        prompt = torch.tensor([item["prompt_input_ids"]])
        per_token = []
        for side in ("chosen", "rejected"):
            completion = torch.tensor([item[f"{side}_input_ids"]])
            with torch.no_grad():
                logps = [completion_logps(model, prompt, torch.ones_like(prompt), completion,
                                          torch.ones_like(completion)).item() for model in (policy, reference)]
            per_token.append((logps[0] - logps[1]) / completion.shape[1])
        expected.append((per_token[0] - per_token[1] - 1 / (2 * 0.5)) ** 2)
    assert metrics["eval_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)


class FakeAccelerator:
    """Process `process_index` of `num_processes`; `reduce` records what it was given."""

    def __init__(self, process_index, num_processes):
        self.process_index, self.num_processes, self.reduced = process_index, num_processes, None

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.reduced = tensor.clone()
        return tensor


def test_processes_share_the_pairs_evenly(tiny_tokenizer, items):
    policy, reference = build_model(tiny_tokenizer, seed=2), build_model(tiny_tokenizer, seed=3)
    ctx = _context(policy, reference, tiny_tokenizer)
    shards = [FakeAccelerator(i, 2) for i in range(2)]
    for accelerator in shards:
        evaluate_pairs(ctx, items, batch_size=1, accelerator=accelerator)
    together = shards[0].reduced + shards[1].reduced  # what the all-reduce adds up
    assert together[0] == 4  # 5 pairs, 2 processes: 2 each, the same number of batches
    assert torch.allclose(together, pair_metric_sums(ctx, items[:4], batch_size=4), atol=1e-6)


def test_held_out_pairs_of_a_config(tiny_tokenizer, tiny_task, tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", PAIRS)
    config = HyPOConfig(dataset=str(tiny_task["pairs"]), eval_dataset=str(path), eval_dataset_split="train",
                        eval_max_pairs=3, max_length=64, max_prompt_length=32)
    data = load_training_data(config, tiny_tokenizer)
    assert len(data.eval_pairs) == 3 and data.eval_pairs[0]["prompt"] == PAIRS[0]["prompt"]
    no_eval = HyPOConfig(dataset=str(tiny_task["pairs"]), eval_dataset=str(path), eval_at_end=False)
    assert load_training_data(no_eval, tiny_tokenizer).eval_pairs is None


def test_preflight_checks_the_held_out_pairs_with_their_split(tiny_task, tmp_path):
    from hypo.data.files import DataError
    from hypo.data.sources import check_run_sources, run_sources

    def check_data(config):
        check_run_sources(run_sources(config), skip_bad_rows=config.skip_bad_rows)

    path = write_jsonl(tmp_path / "test.jsonl", [PAIRS[0], {**PAIRS[1], "chosen": ""}])
    config = HyPOConfig(dataset=str(tiny_task["pairs"]), eval_dataset=str(path), eval_dataset_split="train",
                        method="dpo", eval_prompts=str(tiny_task["eval_prompts"]))
    with pytest.raises(DataError, match=r"test.jsonl: row 2: field 'chosen': empty text"):
        check_data(config)
    check_data(HyPOConfig(**{**config.to_dict(), "eval_at_end": False}))  # not evaluated: not read
