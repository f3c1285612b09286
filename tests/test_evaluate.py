"""Statistics of the evaluation: standard errors across prompts, win-rate intervals, ties as half."""

import math

import pytest

from hypo.evaluate import mean_and_se, prompt_text, summarize, win_rate_interval


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


def test_prompt_text_takes_last_user_message():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"}]
    assert prompt_text(messages) == "second"
    assert prompt_text("plain") == "plain"
