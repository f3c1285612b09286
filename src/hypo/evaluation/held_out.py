"""Evaluation on held-out prompts: sequence-level reverse KL to the reference and judged win rate.

Protocol (docs/design.md: evaluation protocol): for each held-out prompt, sample `num_samples` completions from the policy
and from the reference at temperature 1. The reverse KL is estimated on the policy samples
(k1 = log pi - log pi_ref, and k3), the judge compares policy sample j with reference sample j.
With another `temperature` or `top_p`, the judged completions (policy and baseline) use them, and the KL
is estimated on separate temperature-1 policy samples: k1 and k3 estimate KL(pi || pi_ref) only on draws
from pi itself. Those are drawn first with the same seed, so the KL does not depend on the temperature.
Completions stop at any of the model's stop tokens (`hypo.models.tokens.stop_token_ids`).
The baseline of the comparison may instead be another model's samples, or fixed responses from a
dataset (one per prompt, compared with each policy sample); the KL is always to the reference.
Judges: gold judges and reward models score each completion (`judge/*_score` with standard errors,
win = higher score), pairwise judges (the LLM judge) only compare.
Uncertainty is taken across prompts (samples of one prompt are not independent): mean +- standard
error, and a 95% normal interval for the win rate. Ties count as half a win. A judgment the judge could not
give (an LLM judge's unreadable replies: `win` None) is neither a win, a loss nor a tie: the win rate, its
interval and the tie rate are over valid judgments only, `num_invalid` / `invalid_rate` count the others, and
below `min_valid_fraction` valid judgments no win rate is reported at all (`win_rate_withheld`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from hypo.evaluation.stats import mean_and_se, win_rate_interval
from hypo.models.tokens import stop_token_ids
from hypo.objective.logprobs import completion_logps
from hypo.objective.losses import kl_estimates
from hypo.runtime.distributed import is_sharded
from hypo.sampling.generate import generate_completions, resolve_cache_implementation

KL_ON_JUDGED_SAMPLES = "the judged policy samples (temperature 1, no truncation)"
KL_ON_SEPARATE_SAMPLES = "separate policy samples at temperature 1, no truncation (not the judged ones)"
MIN_VALID_FRACTION = 0.9
"""The default least fraction of valid judgments with which a win rate is reported (`hypo eval
--judge_min_valid_fraction`): unreadable verdicts left out of more than a tenth of the comparisons could bias it."""


def prompt_text(prompt: str | list[dict]) -> str:
    """What a judge reads as the prompt: the text, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


@torch.no_grad()
def _score_batch(policy, reference, tokenizer, batch, *, num_samples, max_new_tokens, seed, baseline=None,
                 sample_baseline: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                 cache_implementation: str = "auto", baseline_samples: dict | None = None) -> dict[str, Any]:
    """Sample the policy, score its temperature-1 samples under policy and reference, and (if
    `sample_baseline`) sample the baseline: the `baseline` model, or the reference when it is None. The
    baseline is frozen, so with a `baseline_samples` dict its samples for the same prompts, seed and settings
    are drawn once and reused (periodic evaluations during training).

    The judged completions use `temperature` and `top_p`; when these are not 1, the KL samples are drawn
    first (same seed as at temperature 1) and the judged policy samples continue the same random stream.

    Shape: batch of G prompts -> lists of G * num_samples values (rows [g * k, (g + 1) * k) share prompt g)
    """
    common = {"num_generations": num_samples, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "cache_implementation": cache_implementation}
    decoding = {"temperature": temperature, "top_p": top_p}
    separate_kl_samples = temperature != 1.0 or top_p != 1.0
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    policy_stops = stop_token_ids(policy, tokenizer)
    torch.manual_seed(seed)
    kl_samples = generate_completions(policy, prompt_ids, prompt_mask, eos_token_id=policy_stops, **common)  # T = 1
    samples = kl_samples
    if separate_kl_samples:
        samples = generate_completions(policy, prompt_ids, prompt_mask, eos_token_id=policy_stops, **common, **decoding)
    args = (kl_samples.prompt_input_ids, kl_samples.prompt_attention_mask, kl_samples.completion_ids,
            kl_samples.completion_mask)
    policy_logps = completion_logps(policy, *args)  # (G * k,)
    key = (seed, num_samples, max_new_tokens, temperature, top_p, prompt_ids.cpu().numpy().tobytes(),
           prompt_mask.cpu().numpy().tobytes())
    cached = baseline_samples.get(key) if baseline_samples is not None and sample_baseline else None
    other = None
    with reference.active() as ref_model:
        ref_logps = completion_logps(ref_model, *args)  # (G * k,)
        torch.manual_seed(seed + 1)
        if sample_baseline and cached is None:
            model = ref_model if baseline is None else baseline
            other = generate_completions(model, prompt_ids, prompt_mask, eos_token_id=stop_token_ids(model, tokenizer),
                                         **common, **decoding)
    estimates = kl_estimates(policy_logps, ref_logps)
    scored = {
        "policy_text": completion_texts(tokenizer, samples),
        "k1": estimates["k1"].tolist(), "k3": estimates["k3"].tolist(),
        "policy_length": samples.lengths.tolist(), "policy_eos": (~samples.clipped).tolist(),
    }
    if separate_kl_samples:
        scored["kl_sample_text"] = completion_texts(tokenizer, kl_samples)
        scored["kl_sample_length"] = kl_samples.lengths.tolist()
    if other is not None:
        cached = {"reference_text": completion_texts(tokenizer, other), "reference_length": other.lengths.tolist()}
        if baseline_samples is not None:
            baseline_samples[key] = cached
    if cached is not None:
        scored.update(cached)
    return scored


def completion_texts(tokenizer, completions) -> list[str]:
    """Decoded completions without their stop token (which need not be a special token) or padding."""
    keep = completions.completion_mask.clone()  # (N, C)
    stopped = ~completions.clipped  # (N,)
    rows = stopped.nonzero().squeeze(-1)
    keep[rows, completions.lengths[rows] - 1] = 0
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(completions.completion_ids, keep, strict=True)]


def _baseline_columns(tokenizer, texts: list[str], num_samples: int) -> dict[str, list]:
    """Fixed baseline responses (one per prompt) repeated for each of the prompt's samples."""
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]  # + EOS
    repeat = [i for i in range(len(texts)) for _ in range(num_samples)]
    return {"reference_text": [texts[i] for i in repeat], "reference_length": [lengths[i] for i in repeat]}


def _rows(items: list[dict], start: int, num_samples: int, scored: dict[str, list]) -> list[dict[str, Any]]:
    """One row per completion: its prompt's index and text, and the scored columns."""
    rows = []
    for i in range(len(items) * num_samples):
        row = {"prompt_index": start + i // num_samples, "prompt": prompt_text(items[i // num_samples]["prompt"])}
        rows.append({**row, **{key: values[i] for key, values in scored.items()}})
    return rows


def judge_rows(judge, rows: list[dict[str, Any]]) -> None:
    """Add `win` (1 policy better, 0 baseline better, 0.5 tie, None for an invalid judgment) to each row, and
    `policy_score` / `reference_score` when the judge scores single completions (pairwise judges only compare).

    Judges with `score_batch(prompts, completions)` (reward models) are called once per side; judges with
    `judge_all(items)` (the LLM judge: concurrent requests) once for all rows, an invalid judgment's row also
    getting the judge's last reply (`judge_reply`).
    """
    from hypo.evaluation.judges import compare, score_all

    prompts = [r["prompt"] for r in rows]
    if callable(getattr(judge, "score", None)):
        policy_scores = score_all(judge, prompts, [r["policy_text"] for r in rows])
        reference_scores = score_all(judge, prompts, [r["reference_text"] for r in rows])
        for row, a, b in zip(rows, policy_scores, reference_scores, strict=True):
            row.update(policy_score=a, reference_score=b, win=1.0 if a > b else 0.0 if a < b else 0.5)
        return
    if callable(getattr(judge, "judge_all", None)):
        judgments = judge.judge_all([(r["prompt"], r["policy_text"], r["reference_text"]) for r in rows])
        for row, judgment in zip(rows, judgments, strict=True):
            row["win"] = judgment.win
            if judgment.win is None:
                row["judge_reply"] = judgment.reply
        return
    for row in rows:
        row["win"] = compare(judge, row["prompt"], row["policy_text"], row["reference_text"])


def evaluate_policy(policy, reference, tokenizer, prompts: list[dict], *, judge, num_samples: int,
                    max_new_tokens: int, batch_size: int, seed: int, baseline=None,
                    baseline_texts: list[str] | None = None, baseline_name: str = "reference",
                    temperature: float = 1.0, top_p: float = 1.0,
                    cache_implementation: str = "auto", baseline_samples: dict | None = None,
                    min_valid_fraction: float = MIN_VALID_FRACTION) -> dict[str, Any]:
    """Evaluate `policy` against `reference` (a `hypo.models.reference.Reference`) on tokenized prompt items.

    The reverse KL is always to the reference, estimated on temperature-1 policy samples. The judge (a
    registered name, `rm:<path>`, or a judge object) compares each policy sample with a baseline: a sample of
    the reference (default), of the `baseline` model, or the fixed response `baseline_texts[i]` of prompt i.
    Judged samples, policy and baseline, use `temperature` and `top_p`; when these are not 1 the KL is
    estimated on separate temperature-1 samples (settings: `kl_samples`). The global RNG state is restored
    afterwards, so evaluating during training does not change the training run. `baseline_samples`: a dict
    kept across calls, in which the frozen baseline's samples are drawn once (the same samples a call
    without it draws). `min_valid_fraction`: see `summarize`.
    """
    from hypo.data.batches import PromptCollator
    from hypo.evaluation.judges import get_judge

    if baseline_texts is not None and len(baseline_texts) != len(prompts):
        raise ValueError(f"{len(baseline_texts)} baseline responses for {len(prompts)} prompts")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}")
    judge_impl = get_judge(judge) if isinstance(judge, str) else judge
    collate, device = PromptCollator(tokenizer.pad_token_id), next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    rows: list[dict[str, Any]] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(prompts), batch_size):
                items = prompts[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                scored = _score_batch(policy, reference, tokenizer, batch, num_samples=num_samples,
                                      max_new_tokens=max_new_tokens, seed=seed + 2 * start, baseline=baseline,
                                      sample_baseline=baseline_texts is None, temperature=temperature, top_p=top_p,
                                      cache_implementation=cache_implementation, baseline_samples=baseline_samples)
                if baseline_texts is not None:
                    scored.update(_baseline_columns(tokenizer, baseline_texts[start : start + batch_size], num_samples))
                rows += _rows(items, start, num_samples, scored)
    finally:
        policy.train(was_training)
    if judge_impl is not None:
        judge_rows(judge_impl, rows)
    separate = temperature != 1.0 or top_p != 1.0
    settings = {"judge": getattr(judge_impl, "name", None), "baseline": baseline_name, "num_prompts": len(prompts),
                "num_samples": num_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "kl_samples": KL_ON_SEPARATE_SAMPLES if separate else KL_ON_JUDGED_SAMPLES,
                "stop_token_ids": stop_token_ids(policy, tokenizer),
                "cache_implementation": resolve_cache_implementation(cache_implementation, device,
                                                                     sharded=is_sharded(policy)), "seed": seed}
    if judge_impl is not None:
        settings["judge_min_valid_fraction"] = min_valid_fraction
    metrics = summarize(rows, judge_impl is not None, min_valid_fraction=min_valid_fraction)
    return {"metrics": metrics, "samples": rows, "settings": settings}


def _per_prompt_means(rows: list[dict], key: str) -> list[float]:
    groups: dict[int, list[float]] = {}
    for row in rows:
        groups.setdefault(row["prompt_index"], []).append(float(row[key]))
    return [sum(v) / len(v) for v in groups.values()]


def summarize(rows: list[dict], judged: bool, *, min_valid_fraction: float = MIN_VALID_FRACTION) -> dict[str, float]:
    """Means with standard errors across prompts (sample counts included). Judged: `num_invalid` and
    `invalid_rate` (judgments with `win` None), and over the valid judgments only the win rate (per-prompt
    means over each prompt's valid judgments, a prompt with none left out), its 95% interval across prompts
    and the tie rate; the win rate is left out when fewer than `min_valid_fraction` of the judgments (or none)
    are valid.

    Example: wins [1, None, 0.5] of one prompt and [0] of another: num_invalid 1, invalid_rate 0.25; per-prompt
    means [0.75, 0] -> win rate 0.375, tie rate 1/3 (reported with min_valid_fraction 0.75, withheld at 0.9).
    """
    metrics: dict[str, float] = {"num_prompts": len({r["prompt_index"] for r in rows}), "num_completions": len(rows)}
    for name, key in (("objective/kl", "k1"), ("objective/kl_k3", "k3"), ("completions/mean_length", "policy_length"),
                      ("completions/eos_rate", "policy_eos"), ("reference/mean_length", "reference_length")):
        metrics[name], metrics[f"{name}_se"] = mean_and_se(_per_prompt_means(rows, key))
    if judged and rows and "policy_score" in rows[0]:  # pairwise judges give no scores
        for name, key in (("judge/policy_score", "policy_score"), ("judge/reference_score", "reference_score")):
            metrics[name], metrics[f"{name}_se"] = mean_and_se(_per_prompt_means(rows, key))
    if judged:
        valid = [r for r in rows if r["win"] is not None]
        num_invalid = len(rows) - len(valid)
        metrics.update(num_invalid=num_invalid, invalid_rate=num_invalid / len(rows) if rows else math.nan)
        if valid and len(valid) >= min_valid_fraction * len(rows):
            rate, low, high = win_rate_interval(_per_prompt_means(valid, "win"))
            metrics.update({"win_rate": rate, "win_rate_ci_low": low, "win_rate_ci_high": high,
                            "tie_rate": sum(r["win"] == 0.5 for r in valid) / len(valid)})
    return metrics


def win_rate_withheld(metrics: dict[str, float], settings: dict[str, Any] | None = None) -> str | None:
    """Why a judged evaluation reports no win rate (too few valid judgments), naming the counts; None if it
    reports one or was not judged."""
    if "win_rate" in metrics or "num_invalid" not in metrics or not metrics.get("num_completions"):
        return None
    total, invalid = int(metrics["num_completions"]), int(metrics["num_invalid"])
    least = (settings or {}).get("judge_min_valid_fraction", MIN_VALID_FRACTION)
    return (f"win rate withheld: {total - invalid} of {total} judgments valid ({(total - invalid) / total:.0%}), "
            f"fewer than the {least:.0%} required (--judge_min_valid_fraction); {invalid} judgments had no "
            "readable verdict (win null in eval_samples.jsonl, with the judge's last reply)")


def write_eval_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    """`eval_results.json` (metrics + settings), `eval_samples.jsonl` (every completion, scored) and
    `eval_report.md` (the same, for people)."""
    from hypo.evaluation.report import eval_report_markdown

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "eval_results.json"
    path.write_text(json.dumps({"metrics": results["metrics"], "settings": results["settings"]}, indent=2) + "\n")
    with (output_dir / "eval_samples.jsonl").open("w") as f:
        for row in results["samples"]:
            f.write(json.dumps(row) + "\n")
    (output_dir / "eval_report.md").write_text(eval_report_markdown(results))
    return path


def baseline_responses(rows: list[dict], field: str, source: str) -> list[str]:
    """The text of `field` in each row (a string, or the content of the last message of a list)."""
    texts = []
    for number, row in enumerate(rows, 1):
        value = row.get(field) if isinstance(row, dict) else None
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = value[-1].get("content")
        if not isinstance(value, str):
            raise ValueError(f"{source}: row {number}: field {field!r}: expected a response text or message list")
        texts.append(value)
    return texts


def judge_label(settings: dict[str, Any] | None) -> str:
    """'gold' for registered judges, 'reward-model' for rm:<path>, 'LLM' for llm:<model>."""
    name = str((settings or {}).get("judge") or "")
    return "reward-model" if name.startswith("rm:") else "LLM" if name.startswith("llm:") else "gold"


def format_summary(metrics: dict[str, float], settings: dict[str, Any] | None = None) -> list[str]:
    """Human-readable lines: reverse KL with its standard error, win rate with its interval."""
    n = f"{int(metrics['num_prompts'])} prompts, {int(metrics['num_completions'])} completions"
    baseline = (settings or {}).get("baseline", "reference")
    lines = [f"held-out evaluation ({n}):",
             f"  reverse KL to reference  {metrics['objective/kl']:.3f} +- {metrics['objective/kl_se']:.3f} nats "
             f"(k1; k3 {metrics['objective/kl_k3']:.3f} +- {metrics['objective/kl_k3_se']:.3f})",
             f"  mean completion length   {metrics['completions/mean_length']:.1f} tokens "
             f"({baseline} {metrics['reference/mean_length']:.1f}), EOS rate {metrics['completions/eos_rate']:.2f}"]
    if (settings or {}).get("kl_samples") == KL_ON_SEPARATE_SAMPLES:
        lines.insert(2, f"    (KL on separate temperature-1 samples; judged samples at temperature "
                        f"{settings['temperature']}, top_p {settings['top_p']})")
    if "win_rate" in metrics:
        line = (f"  {judge_label(settings)} win rate vs {baseline}  {metrics['win_rate']:.3f} "
                f"[{metrics['win_rate_ci_low']:.3f}, {metrics['win_rate_ci_high']:.3f}] 95% CI, "
                f"ties {metrics['tie_rate']:.2f}")
        if metrics.get("num_invalid"):
            line += (f", over {int(metrics['num_completions'] - metrics['num_invalid'])} valid judgments "
                     f"({int(metrics['num_invalid'])} invalid)")
        if "judge/policy_score" in metrics:
            line += f"; judge score {metrics['judge/policy_score']:.3f} vs {metrics['judge/reference_score']:.3f}"
        lines.append(line)
    withheld = win_rate_withheld(metrics, settings)
    if withheld:
        lines.append(f"  {judge_label(settings)} {withheld}")
    return lines


def evaluate_during_training(accelerator, policy, reference, tokenizer, data, config, run_logger, step: int, *,
                             final: bool = False, output_dir: Path | None = None,
                             baseline_samples: dict | None = None) -> dict[str, Any] | None:
    """The held-out evaluation of a training run (`data`: a `hypo.data.sources.TrainingData`), logged as `eval_*`
    keys at `step`. Every process joins (under FSDP2 / ZeRO-3 the full weights of the policy and of the
    reference are gathered first: the main process then runs both alone); the main process evaluates while
    the others wait. Every `eval_steps` it uses the first
    `eval_max_prompts_during_training` prompts; the `final` one uses `eval_max_prompts` and also writes
    eval_results.json, eval_samples.jsonl and eval_report.md. Returns the results on the main process
    (None elsewhere). `baseline_samples` (a dict the run keeps): the reference's samples are drawn once."""
    from hypo.runtime.distributed import gathered_for_generation

    results = None
    with gathered_for_generation(accelerator.unwrap_model(policy), policy) as model, reference.gathered():
        if accelerator.is_main_process:
            limit = config.eval_max_prompts if final else \
                (config.eval_max_prompts_during_training or config.eval_max_prompts)
            prompts = data.eval_prompts[:limit] if limit else data.eval_prompts
            results = evaluate_policy(model, reference, tokenizer, prompts, judge=data.judge,
                                      num_samples=config.eval_num_samples, max_new_tokens=config.max_completion_length,
                                      batch_size=config.eval_batch_size, seed=config.seed,
                                      temperature=config.eval_temperature, top_p=config.eval_top_p,
                                      cache_implementation=config.cache_implementation,
                                      baseline_samples=baseline_samples)
            if final:
                write_eval_results(results, output_dir)
            run_logger.log({f"eval_{k}": v for k, v in results["metrics"].items()}, step)
        accelerator.wait_for_everyone()
    return results
