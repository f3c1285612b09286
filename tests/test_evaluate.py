"""Statistics of the evaluation: standard errors across prompts, win-rate intervals, ties as half; the
model's stop tokens; tempered judged samples with the KL still estimated on temperature-1 samples."""

import math

import pytest
import torch

from conftest import build_model
from hypo.data.encoding import tokenize_prompt_rows
from hypo.evaluation.held_out import (
    KL_ON_JUDGED_SAMPLES,
    KL_ON_SEPARATE_SAMPLES,
    MIN_VALID_FRACTION,
    completion_texts,
    evaluate_policy,
    format_summary,
    prompt_text,
    summarize,
    win_rate_withheld,
)
from hypo.evaluation.stats import mean_and_se, win_rate_interval
from hypo.models.reference import Reference


def test_mean_and_se_values():
    """[1, 2, 3]: mean 2, sample sd 1, se 1/sqrt(3) = 0.57735; one value has no se."""
    assert mean_and_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 0.577350), abs=1e-6)
    mean, se = mean_and_se([4.0])
    assert mean == 4.0 and math.isnan(se)


def test_win_rate_interval_values():
    """wins [1, 0, 1, 1]: mean 0.75, sd 0.5, se 0.25, 95% CI 0.75 +- 1.96 * 0.25 -> [0.26, 1.0] (clipped)."""
    rate, low, high = win_rate_interval([1.0, 0.0, 1.0, 1.0])
    assert rate == 0.75
    assert low == pytest.approx(0.75 - 1.959964 * 0.25, abs=1e-6)
    assert high == 1.0


def test_summarize_averages_samples_within_prompts_and_counts_ties_as_half():
    rows = [
        {"prompt_index": 0, "k1": 1.0, "k3": 0.5, "policy_length": 4, "policy_eos": True, "reference_length": 6,
         "policy_score": 1.0, "reference_score": 0.0, "win": 1.0},
        {"prompt_index": 0, "k1": 3.0, "k3": 1.5, "policy_length": 6, "policy_eos": False, "reference_length": 6,
         "policy_score": 0.0, "reference_score": 0.0, "win": 0.5},
        {"prompt_index": 1, "k1": 0.0, "k3": 0.0, "policy_length": 2, "policy_eos": True, "reference_length": 4,
         "policy_score": 0.0, "reference_score": 1.0, "win": 0.0},
    ]
    m = summarize(rows, judged=True)
    # per prompt: k1 means [2, 0] -> 1 +- 1; wins [0.75, 0] -> 0.375
    assert m["objective/kl"] == 1.0 and m["objective/kl_se"] == pytest.approx(1.0)
    assert m["win_rate"] == 0.375 and m["tie_rate"] == pytest.approx(1 / 3)
    assert m["completions/eos_rate"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["num_prompts"] == 2 and m["num_completions"] == 3
    assert "win_rate" not in summarize(rows, judged=False)


def _judged_rows(wins_per_prompt: list[list[float | None]]) -> list[dict]:
    return [{"prompt_index": i, "k1": 0.0, "k3": 0.0, "policy_length": 1, "policy_eos": True, "reference_length": 1,
             "win": win} for i, wins in enumerate(wins_per_prompt) for win in wins]


def test_invalid_judgments_are_neither_wins_losses_nor_ties():
    """wins [1, None, 0.5] and [0]: 1 invalid of 4 (0.25); valid per-prompt means [0.75, 0] -> 0.375, tie rate
    1/3 over the 3 valid; with the invalid one read as a tie the win rate would be (2/3 + 0) / 2 = 0.333."""
    m = summarize(_judged_rows([[1.0, None, 0.5], [0.0]]), judged=True, min_valid_fraction=0.75)
    assert m["num_invalid"] == 1 and m["invalid_rate"] == 0.25
    assert m["win_rate"] == 0.375 and m["tie_rate"] == pytest.approx(1 / 3)
    assert m["win_rate_ci_low"] == pytest.approx(max(0.0, 0.375 - 1.959964 * 0.375))  # sd 0.53033, se 0.375
    # a prompt whose judgments are all invalid leaves the win rate: the interval is across the other prompts
    m = summarize(_judged_rows([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [None, None]]), judged=True,
                  min_valid_fraction=0.5)
    assert m["win_rate"] == 0.5 and m["num_invalid"] == 2 and m["invalid_rate"] == 0.25
    clean = summarize(_judged_rows([[1.0], [0.0]]), judged=True)
    assert clean["num_invalid"] == 0 and clean["invalid_rate"] == 0.0


def test_too_few_valid_judgments_withhold_the_win_rate_and_say_why():
    rows = _judged_rows([[1.0, None, 0.5], [0.0]])  # 3 of 4 valid
    m = summarize(rows, judged=True)  # default: at least 90% valid
    assert "win_rate" not in m and "tie_rate" not in m and m["num_invalid"] == 1
    message = win_rate_withheld(m, {"judge_min_valid_fraction": MIN_VALID_FRACTION})
    assert message.startswith("win rate withheld: 3 of 4 judgments valid (75%), fewer than the 90% required")
    assert any("win rate withheld: 3 of 4" in line for line in format_summary(m, {"judge": "llm:j"}))
    assert "win_rate" in summarize(rows, judged=True, min_valid_fraction=0.75)
    none_valid = summarize(_judged_rows([[None], [None]]), judged=True, min_valid_fraction=0.0)
    assert "win_rate" not in none_valid and "0 of 2 judgments valid" in win_rate_withheld(none_valid)
    assert win_rate_withheld(summarize(rows, judged=False)) is None


def test_prompt_text_takes_last_user_message():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"}]
    assert prompt_text(messages) == "second"
    assert prompt_text("plain") == "plain"


def _items(tokenizer, n=4):
    rows = [{"prompt": [{"role": "user", "content": f"Write a short review of the cafe number {i}."}]}
            for i in range(n)]
    return tokenize_prompt_rows(rows, tokenizer)[0]


def test_evaluation_stops_at_the_models_own_stop_token(tiny_tokenizer):
    """The policy can end only with `other` (the tokenizer's EOS has logit -inf), listed in its
    generation_config.eos_token_id like Llama 3's <|eot_id|>: completions stop there (EOS rate > 0, lengths
    below the limit) and the judged text leaves it out. Stopping at the tokenizer's EOS alone would give EOS
    rate 0 and every completion 8 tokens long."""
    eos, other, vocab = tiny_tokenizer.eos_token_id, 100, len(tiny_tokenizer)
    policy = build_model(tiny_tokenizer, tie_word_embeddings=False)
    policy.generation_config.eos_token_id = other
    policy.lm_head.weight.data.zero_()
    policy.lm_head.bias = torch.nn.Parameter(torch.zeros(vocab))
    policy.lm_head.bias.data[other] = math.log((vocab - 2) / 3.0)  # 1/4 of the mass
    policy.lm_head.bias.data[eos] = -math.inf
    results = evaluate_policy(policy, Reference(build_model(tiny_tokenizer, seed=1)), tiny_tokenizer,
                              _items(tiny_tokenizer), judge=None, num_samples=4, max_new_tokens=8, batch_size=2,
                              seed=0)
    rows, metrics = results["samples"], results["metrics"]
    assert results["settings"]["stop_token_ids"] == [other, eos]
    assert metrics["completions/eos_rate"] > 0.5 and metrics["completions/mean_length"] < 7
    assert all(row["policy_eos"] or row["policy_length"] == 8 for row in rows)


def test_completion_texts_leave_out_the_stop_token(tiny_tokenizer):
    """The stop token need not be special (skip_special_tokens would not drop it): it is cut before decoding."""
    from hypo.sampling.generate import Completions

    pad, other = tiny_tokenizer.pad_token_id, 100
    ids = torch.tensor([[50, 60, other, pad], [50, 60, 70, 80]])
    completions = Completions(prompt_input_ids=ids[:, :1], prompt_attention_mask=torch.ones(2, 1),
                              completion_ids=ids, completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                              clipped=torch.tensor([False, True]))
    assert completion_texts(tiny_tokenizer, completions) == [tiny_tokenizer.decode([50, 60]),
                                                             tiny_tokenizer.decode([50, 60, 70, 80])]
    assert tiny_tokenizer.decode([50, 60, other]) != tiny_tokenizer.decode([50, 60])


def _peaked(tokenizer, seed):
    model = build_model(tokenizer, seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # distinct samples at temperature 1, one greedy path at 0.01
    return model


def test_eval_temperature_changes_the_judged_samples_not_the_kl_estimate(tiny_tokenizer):
    """Same seed, temperature 1 vs (0.01, top_p 0.5): every k1 and k3 value is identical (the KL is estimated on
    temperature-1 samples drawn first with the same seed, which are the judged samples at temperature 1),
    while the judged samples, policy and reference, become the greedy path: identical within each prompt."""
    policy, reference = _peaked(tiny_tokenizer, 2), Reference(_peaked(tiny_tokenizer, 3))
    kwargs = dict(judge=None, num_samples=3, max_new_tokens=6, batch_size=2, seed=5)
    items = _items(tiny_tokenizer)
    plain = evaluate_policy(policy, reference, tiny_tokenizer, items, **kwargs)
    cold = evaluate_policy(policy, reference, tiny_tokenizer, items, temperature=0.01, top_p=0.5, **kwargs)

    assert [r["k1"] for r in cold["samples"]] == [r["k1"] for r in plain["samples"]]
    assert [r["k3"] for r in cold["samples"]] == [r["k3"] for r in plain["samples"]]
    assert cold["metrics"]["objective/kl"] == plain["metrics"]["objective/kl"] != 0
    assert [r["kl_sample_text"] for r in cold["samples"]] == [r["policy_text"] for r in plain["samples"]]
    assert plain["settings"]["kl_samples"] == KL_ON_JUDGED_SAMPLES and "kl_sample_text" not in plain["samples"][0]
    assert cold["settings"]["kl_samples"] == KL_ON_SEPARATE_SAMPLES
    assert (cold["settings"]["temperature"], cold["settings"]["top_p"]) == (0.01, 0.5)
    assert any("separate temperature-1 samples" in line for line in format_summary(cold["metrics"], cold["settings"]))

    def distinct_per_prompt(results, key):
        groups = {}
        for row in results["samples"]:
            groups.setdefault(row["prompt_index"], set()).add(row[key])
        return [len(texts) for texts in groups.values()]

    assert distinct_per_prompt(cold, "policy_text") == [1, 1, 1, 1]
    assert distinct_per_prompt(cold, "reference_text") == [1, 1, 1, 1]
    assert max(distinct_per_prompt(plain, "policy_text")) > 1 and max(distinct_per_prompt(plain, "reference_text")) > 1


def test_eval_temperature_must_be_positive(tiny_tokenizer):
    model = build_model(tiny_tokenizer)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        evaluate_policy(model, Reference(build_model(tiny_tokenizer)), tiny_tokenizer, _items(tiny_tokenizer, 1),
                        judge=None, num_samples=1, max_new_tokens=2, batch_size=1, seed=0, temperature=0.0)


def test_the_frozen_reference_is_sampled_once_across_evaluations(tiny_tokenizer, monkeypatch):
    """With a `baseline_samples` dict kept across calls (periodic evaluations of one run), the reference's
    samples are drawn at the first call only, and are the samples a call without the dict draws; the policy,
    which changes between evaluations, is sampled every time."""
    import hypo.evaluation.held_out

    policy, reference = _peaked(tiny_tokenizer, 2), Reference(_peaked(tiny_tokenizer, 3))
    kwargs = dict(judge=None, num_samples=3, max_new_tokens=6, batch_size=2, seed=5)
    items = _items(tiny_tokenizer)
    plain = evaluate_policy(policy, reference, tiny_tokenizer, items, **kwargs)
    sampled = []
    generate = hypo.evaluation.held_out.generate_completions
    monkeypatch.setattr(hypo.evaluation.held_out, "generate_completions", lambda model, *a, **k: sampled.append(model) or
                        generate(model, *a, **k))
    kept: dict = {}
    first = evaluate_policy(policy, reference, tiny_tokenizer, items, baseline_samples=kept, **kwargs)
    with torch.no_grad():  # the policy moves between evaluations
        policy.lm_head.weight.mul_(0.5)
    second = evaluate_policy(policy, reference, tiny_tokenizer, items, baseline_samples=kept, **kwargs)
    batches = math.ceil(len(items) / 2)
    assert [m is reference.model for m in sampled] == [False, True] * batches + [False] * batches
    for results in (first, second):
        assert [r["reference_text"] for r in results["samples"]] == [r["reference_text"] for r in plain["samples"]]
    assert [r["policy_text"] for r in first["samples"]] == [r["policy_text"] for r in plain["samples"]]
    assert first["metrics"] == plain["metrics"] and second["metrics"] != plain["metrics"]
