"""Evaluation on held-out prompts: sequence-level reverse KL to the reference and judged win rate.

Protocol (DESIGN section 3): for each held-out prompt, sample `num_samples` completions from the policy
and from the reference at temperature 1. The reverse KL is estimated on the policy samples
(k1 = log pi - log pi_ref, and k3), the judge compares policy sample j with reference sample j.
Uncertainty is taken across prompts (samples of one prompt are not independent): mean +- standard
error, and a 95% normal interval for the win rate. Ties count as half a win.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from hypo.logprobs import completion_logps
from hypo.losses import kl_estimates
from hypo.sampling import generate_completions

Z_95 = 1.959964


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n)); se is nan for n < 2.

    Example: [1, 2, 3] -> mean 2, sd 1, se 1 / sqrt(3) = 0.57735.
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def win_rate_interval(per_prompt_wins: list[float]) -> tuple[float, float, float]:
    """Win rate and its 95% normal interval across prompts, clipped to [0, 1]."""
    mean, se = mean_and_se(per_prompt_wins)
    if math.isnan(se):
        return mean, math.nan, math.nan
    return mean, max(0.0, mean - Z_95 * se), min(1.0, mean + Z_95 * se)


def prompt_text(prompt: str | list[dict]) -> str:
    """What a judge reads as the prompt: the text, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


@torch.no_grad()
def _score_batch(policy, reference, tokenizer, batch, *, num_samples, max_new_tokens, seed) -> dict[str, Any]:
    sample_kwargs = {"num_generations": num_samples, "max_new_tokens": max_new_tokens,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    torch.manual_seed(seed)
    samples = generate_completions(policy, prompt_ids, prompt_mask, **sample_kwargs)
    args = (samples.prompt_input_ids, samples.prompt_attention_mask, samples.completion_ids, samples.completion_mask)
    policy_logps = completion_logps(policy, *args)
    with reference.active() as ref_model:
        ref_logps = completion_logps(ref_model, *args)
        torch.manual_seed(seed + 1)
        baseline = generate_completions(ref_model, prompt_ids, prompt_mask, **sample_kwargs)
    estimates = kl_estimates(policy_logps, ref_logps)
    return {
        "policy_text": tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True),
        "reference_text": tokenizer.batch_decode(baseline.completion_ids, skip_special_tokens=True),
        "k1": estimates["k1"].tolist(), "k3": estimates["k3"].tolist(),
        "policy_length": samples.lengths.tolist(), "policy_eos": (~samples.clipped).tolist(),
        "reference_length": baseline.lengths.tolist(),
    }


def evaluate_policy(policy, reference, tokenizer, prompts: list[dict], *, judge: str | None, num_samples: int,
                    max_new_tokens: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Evaluate `policy` against `reference` (a `hypo.models.Reference`) on tokenized prompt items."""
    from hypo.data import PromptCollator
    from hypo.judges import compare, get_judge

    judge_impl = get_judge(judge) if judge else None
    collate, device = PromptCollator(tokenizer.pad_token_id), next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            items = prompts[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(items).items()}
            scored = _score_batch(policy, reference, tokenizer, batch, num_samples=num_samples,
                                  max_new_tokens=max_new_tokens, seed=seed + 2 * start)
            for i in range(len(items) * num_samples):
                item = items[i // num_samples]
                row = {"prompt_index": start + i // num_samples, "prompt": prompt_text(item["prompt"]),
                       **{key: values[i] for key, values in scored.items()}}
                if judge_impl is not None:
                    text = row["prompt"]
                    row["policy_score"] = judge_impl.score(text, row["policy_text"])
                    row["reference_score"] = judge_impl.score(text, row["reference_text"])
                    row["win"] = compare(judge_impl, text, row["policy_text"], row["reference_text"])
                rows.append(row)
    finally:
        policy.train(was_training)
    return {"metrics": summarize(rows, judge_impl is not None), "samples": rows,
            "settings": {"judge": judge, "num_prompts": len(prompts), "num_samples": num_samples,
                         "max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": seed}}


def _per_prompt_means(rows: list[dict], key: str) -> list[float]:
    groups: dict[int, list[float]] = {}
    for row in rows:
        groups.setdefault(row["prompt_index"], []).append(float(row[key]))
    return [sum(v) / len(v) for v in groups.values()]


def summarize(rows: list[dict], judged: bool) -> dict[str, float]:
    """Means with standard errors across prompts (sample counts included)."""
    metrics: dict[str, float] = {"num_prompts": len({r["prompt_index"] for r in rows}), "num_completions": len(rows)}
    for name, key in (("objective/kl", "k1"), ("objective/kl_k3", "k3"), ("completions/mean_length", "policy_length"),
                      ("completions/eos_rate", "policy_eos"), ("reference/mean_length", "reference_length")):
        metrics[name], metrics[f"{name}_se"] = mean_and_se(_per_prompt_means(rows, key))
    if judged:
        for name, key in (("judge/policy_score", "policy_score"), ("judge/reference_score", "reference_score")):
            metrics[name], metrics[f"{name}_se"] = mean_and_se(_per_prompt_means(rows, key))
        rate, low, high = win_rate_interval(_per_prompt_means(rows, "win"))
        metrics.update({"win_rate": rate, "win_rate_ci_low": low, "win_rate_ci_high": high,
                        "tie_rate": sum(r["win"] == 0.5 for r in rows) / len(rows)})
    return metrics


def write_eval_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    """`eval_results.json` (metrics + settings) and `eval_samples.jsonl` (every completion, scored)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "eval_results.json"
    path.write_text(json.dumps({"metrics": results["metrics"], "settings": results["settings"]}, indent=2) + "\n")
    with (output_dir / "eval_samples.jsonl").open("w") as f:
        for row in results["samples"]:
            f.write(json.dumps(row) + "\n")
    return path


def format_summary(metrics: dict[str, float]) -> list[str]:
    """Human-readable lines: reverse KL with its standard error, win rate with its interval."""
    n = f"{int(metrics['num_prompts'])} prompts, {int(metrics['num_completions'])} completions"
    lines = [f"held-out evaluation ({n}):",
             f"  reverse KL to reference  {metrics['objective/kl']:.3f} +- {metrics['objective/kl_se']:.3f} nats "
             f"(k1; k3 {metrics['objective/kl_k3']:.3f} +- {metrics['objective/kl_k3_se']:.3f})",
             f"  mean completion length   {metrics['completions/mean_length']:.1f} tokens "
             f"(reference {metrics['reference/mean_length']:.1f}), EOS rate {metrics['completions/eos_rate']:.2f}"]
    if "win_rate" in metrics:
        lines.append(f"  gold win rate vs reference  {metrics['win_rate']:.3f} "
                     f"[{metrics['win_rate_ci_low']:.3f}, {metrics['win_rate_ci_high']:.3f}] 95% CI, "
                     f"ties {metrics['tie_rate']:.2f}; judge score {metrics['judge/policy_score']:.3f} "
                     f"vs {metrics['judge/reference_score']:.3f}")
    return lines
