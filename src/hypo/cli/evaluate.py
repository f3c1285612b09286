"""`hypo eval`, `hypo report` and `hypo export`: measuring, comparing and exporting trained models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hypo.config import HyPOConfig
from hypo.evaluation.held_out import MIN_VALID_FRACTION


def _default(name: str):
    """The default of a HyPOConfig field: `hypo eval` shares the training run's evaluation settings."""
    return HyPOConfig.__dataclass_fields__[name].default


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypo eval", description="Evaluate a trained model against a reference on "
                                "held-out prompts: sequence-level reverse KL (k1, k3) and judged win rate. The "
                                "defaults are those of the evaluation at the end of hypo train.")
    p.add_argument("--model", required=True, help="Trained model: local folder, hub id or .gguf file.")
    p.add_argument("--reference", default=None, help="Reference model (default: the embedded default model).")
    p.add_argument("--prompts", default=None, help="Prompt-only data (default: the bundled task's eval prompts).")
    p.add_argument("--prompts_split", default="train", help="Split of --prompts (hub datasets, dataset folders).")
    p.add_argument("--prompts_config", default=None, help="Configuration (subset) of --prompts.")
    p.add_argument("--baseline", default=None,
                   help="Win rate against this model's samples (default: the reference's samples).")
    p.add_argument("--baseline_dataset", default=None,
                   help="Win rate against fixed responses: a data file with prompt and --baseline_field "
                        "(its prompts replace --prompts).")
    p.add_argument("--baseline_field", default="chosen", help="Response field of --baseline_dataset.")
    p.add_argument("--baseline_split", default="train",
                   help="Split of --baseline_dataset (e.g. test for the reference summaries of trl-lib/tldr).")
    p.add_argument("--baseline_config", default=None, help="Configuration (subset) of --baseline_dataset.")
    p.add_argument("--judge", default=None, help="A registered judge name (default: the bundled task's gold judge), "
                   "rm:<reward model folder or hub id>, or llm (an OpenAI-compatible chat endpoint).")
    p.add_argument("--judge_base_url", default=None, help="--judge llm: the endpoint, e.g. http://localhost:8000/v1.")
    p.add_argument("--judge_model", default=None, help="--judge llm: the model name sent to the endpoint.")
    p.add_argument("--judge_api_key_env", default="OPENAI_API_KEY",
                   help="--judge llm: environment variable holding the API key (never written anywhere).")
    p.add_argument("--judge_timeout", type=float, default=60.0,
                   help="--judge llm: seconds to wait for one answer before retrying.")
    p.add_argument("--judge_max_retries", type=int, default=4,
                   help="--judge llm: retries of a failed request (connection error, timeout, HTTP 408, 409, 429, "
                        "5xx), with the openai client's exponential backoff (0.5 s doubling, at most 8 s).")
    p.add_argument("--judge_concurrency", type=int, default=8,
                   help="--judge llm: requests in flight at once; the results and the cache are the same at any "
                        "concurrency.")
    p.add_argument("--judge_parse_retries", type=int, default=2,
                   help="--judge llm: times a reply without a readable verdict is answered with the required format "
                        "and asked again before the judgment counts as invalid (neither win, loss nor tie).")
    p.add_argument("--judge_min_valid_fraction", type=float, default=MIN_VALID_FRACTION,
                   help="Least fraction of valid judgments for a win rate to be reported; below it the results "
                        "are written without one and the command exits with status 3.")
    p.add_argument("--judge_template", default=None, choices=["default", "tldr"],
                   help="--judge llm: the prompt (src/hypo/evaluation/llm_judge.py): default, a general comparison; tldr, the "
                        "paper's TL;DR win rate (which summary of the post is better, as in the DPO paper), with "
                        "--baseline_dataset trl-lib/tldr --baseline_split test --baseline_field completion.")
    p.add_argument("--task", default=_default("task"), help="Bundled task that supplies default prompts and judge.")
    p.add_argument("--num_samples", type=int, default=_default("eval_num_samples"), help="Completions per prompt.")
    p.add_argument("--max_prompts", type=int, default=_default("eval_max_prompts"), help="Prompts to use (0: all).")
    p.add_argument("--max_new_tokens", type=int, default=_default("max_completion_length"), help="Longest completion.")
    p.add_argument("--max_prompt_length", type=int, default=_default("max_prompt_length"),
                   help="Prompts keep their last N tokens.")
    p.add_argument("--batch_size", type=int, default=_default("eval_batch_size"), help="Prompts per generation batch.")
    p.add_argument("--temperature", type=float, default=_default("eval_temperature"),
                   help="Sampling temperature of the judged completions; the reverse KL is always estimated on "
                        "temperature-1 samples of the policy itself.")
    p.add_argument("--top_p", type=float, default=_default("eval_top_p"), help="Nucleus sampling of the judged "
                   "completions (1: off).")
    p.add_argument("--cache_implementation", choices=["auto", "dynamic", "static"],
                   default=_default("cache_implementation"), help="KV cache of generation (auto: static on GPUs).")
    p.add_argument("--seed", type=int, default=_default("seed"),
                   help="Seed of every sample (the same seed gives the same results).")
    p.add_argument("--output_dir", default=None, help="Where to write eval_results.json, eval_samples.jsonl and "
                   "eval_report.md (default: <model>/eval).")
    return p


def _eval_judge(args, output_dir: Path, default: str | None):
    """The judge object or name for `hypo eval`; `llm` caches its verdicts in the output folder."""
    import importlib.util

    if not 0 <= args.judge_min_valid_fraction <= 1:
        raise ValueError(f"--judge_min_valid_fraction must be in [0, 1], got {args.judge_min_valid_fraction}")
    if args.judge != "llm":
        if args.judge_template:
            raise ValueError("--judge_template applies to --judge llm")
        return args.judge or default
    from hypo.evaluation.llm_judge import TEMPLATES, LLMJudge

    if not args.judge_base_url or not args.judge_model:
        raise ValueError("--judge llm needs --judge_base_url and --judge_model")
    if importlib.util.find_spec("openai") is None:
        raise ValueError("--judge llm needs the openai package: pip install 'hypo[judge]'")
    return LLMJudge(args.judge_base_url, args.judge_model, api_key_env=args.judge_api_key_env,
                    cache_path=output_dir / "llm_judge_cache.jsonl", seed=args.seed,
                    max_retries=args.judge_max_retries, timeout=args.judge_timeout,
                    template=TEMPLATES[args.judge_template or "default"], concurrency=args.judge_concurrency,
                    parse_retries=args.judge_parse_retries)


def _eval_prompts(args, task, tokenizer) -> tuple[list[dict], list[str] | None]:
    """Held-out prompts, and the fixed baseline responses when --baseline_dataset is given."""
    from hypo.data.encoding import load_prompt_data, tokenize_prompt_rows
    from hypo.data.files import read_rows
    from hypo.evaluation.held_out import baseline_responses

    if args.baseline_dataset is None:
        prompts, _ = load_prompt_data(args.prompts or str(task.eval_prompts), tokenizer,
                                      max_prompt_length=args.max_prompt_length, split=args.prompts_split,
                                      config_name=args.prompts_config)
        texts = None
    else:
        if args.prompts or args.baseline:
            raise ValueError("--baseline_dataset supplies the prompts and the baseline: drop --prompts/--baseline")
        rows = read_rows(args.baseline_dataset, split=args.baseline_split, config_name=args.baseline_config)
        texts = baseline_responses(rows, args.baseline_field, args.baseline_dataset)
        prompts, _ = tokenize_prompt_rows(rows, tokenizer, source=args.baseline_dataset,
                                          max_prompt_length=args.max_prompt_length)
    if args.max_prompts:
        prompts, texts = prompts[: args.max_prompts], texts[: args.max_prompts] if texts else None
    return prompts, texts


def run_eval(argv: list[str]) -> int:
    import torch

    from hypo.evaluation.held_out import (
        evaluate_policy,
        format_summary,
        win_rate_withheld,
        write_eval_results,
    )
    from hypo.evaluation.llm_judge import JudgeEndpointError
    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.models.reference import Reference, freeze
    from hypo.tasks import get_task

    args = eval_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    task = get_task(args.task)
    model_path = resolve_model_path(args.model)
    out = Path(args.output_dir) if args.output_dir else Path(model_path) / "eval"
    tokenizer = load_tokenizer(model_path)
    prompts, baseline_texts = _eval_prompts(args, task, tokenizer)
    judge = _eval_judge(args, out, task.judge)
    policy = load_causal_lm(model_path)
    reference = Reference(load_causal_lm(resolve_model_path(args.reference)))
    baseline = freeze(load_causal_lm(resolve_model_path(args.baseline))) if args.baseline else None
    baseline_name = args.baseline or (f"{args.baseline_dataset}:{args.baseline_field}" if baseline_texts else
                                      "reference")
    try:
        results = evaluate_policy(policy, reference, tokenizer, prompts, judge=judge, num_samples=args.num_samples,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                  baseline=baseline, baseline_texts=baseline_texts, baseline_name=baseline_name,
                                  temperature=args.temperature, top_p=args.top_p,
                                  cache_implementation=args.cache_implementation,
                                  min_valid_fraction=args.judge_min_valid_fraction)
    except JudgeEndpointError as error:
        print(f"hypo eval: error: {error}", file=sys.stderr)
        return 2
    finally:
        if callable(getattr(judge, "close", None)):
            judge.close()
    results["settings"].update(model=args.model, reference=args.reference or "embedded default",
                               prompts=args.baseline_dataset or args.prompts or str(task.eval_prompts),
                               max_prompt_length=args.max_prompt_length)
    if args.judge == "llm":
        results["settings"].update(judge_base_url=args.judge_base_url, judge_api_key_env=args.judge_api_key_env,
                                   judge_template=args.judge_template or "default",
                                   judge_concurrency=args.judge_concurrency,
                                   judge_parse_retries=args.judge_parse_retries)
    path = write_eval_results(results, out)
    for line in format_summary(results["metrics"], results["settings"]):
        print(line)
    if args.judge == "llm":  # this run's traffic (a rerun answered from the cache sends nothing)
        print(f"LLM judge: {judge.requests} requests, {judge.unreadable_replies} replies without a verdict "
              f"(each answered with the format and asked again, up to {args.judge_parse_retries} times), "
              f"{judge.invalid} invalid judgments")
    print(f"results: {path} (report: {path.parent / 'eval_report.md'})")
    withheld = win_rate_withheld(results["metrics"], results["settings"])
    if withheld:  # the samples and every other number are written; the win rate alone is not reported
        print(f"hypo eval: {withheld}", file=sys.stderr)
        return 3
    return 0


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypo report", description="Compare finished runs: report.md with one "
                                "table (every number with its uncertainty and sample count) and PNG plots.")
    p.add_argument("runs", nargs="+", help="Run folders written by hypo train (config.json, metrics.jsonl, ...).")
    p.add_argument("--output_dir", default="report", help="Where to write report.md and the plots.")
    return p


def run_report(argv: list[str]) -> int:
    from hypo.evaluation.report import write_report

    args = report_parser().parse_args(argv)
    path = write_report(args.runs, args.output_dir)
    print(f"report: {path}")
    return 0


def export_parser() -> argparse.ArgumentParser:
    from hypo.evaluation.export import FORMATS

    p = argparse.ArgumentParser(prog="hypo export", description="Generate a model's answers in the format of a "
                                "standard evaluator: alpaca_eval (AlpacaEval 2's model_outputs JSON) or mt_bench "
                                "(FastChat's model_answer JSONL, both turns). See src/hypo/evaluation/export.py.")
    p.add_argument("--model", required=True, help="Model: local folder, hub id or .gguf file.")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--questions", required=True,
                   help="alpaca_eval: alpaca_eval.json from the Hub dataset tatsu-lab/alpaca_eval (instruction "
                        "rows), or any prompt data; mt_bench: FastChat's data/mt_bench/question.jsonl.")
    p.add_argument("--questions_split", default="train", help="Split of --questions when it is a hub dataset.")
    p.add_argument("--questions_config", default=None, help="Configuration (subset) of --questions.")
    p.add_argument("--output", required=True, help="alpaca_eval: outputs.json; mt_bench: model_answer/<name>.jsonl.")
    p.add_argument("--name", default=None, help="The generator (alpaca_eval) or model_id (mt_bench); default: the "
                   "model folder's name.")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="Longest answer in tokens.")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy. Default: alpaca_eval 0; mt_bench FastChat's temperature per category.")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling when the temperature is above 0.")
    p.add_argument("--batch_size", type=int, default=8, help="Conversations per generation batch.")
    p.add_argument("--max_questions", type=int, default=0, help="Use the first N questions (0: all).")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="Weights for generation; auto: bfloat16 on a GPU, float32 on a CPU.")
    p.add_argument("--seed", type=int, default=42, help="Seed of the sampled answers.")
    return p


def run_export(argv: list[str]) -> int:
    import torch

    from hypo.data.files import read_rows
    from hypo.evaluation.export import alpaca_eval_outputs, model_answer_fn, mt_bench_answers, write_outputs
    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    args = export_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.max_questions < 0 or \
            (args.temperature is not None and args.temperature < 0) or not 0 < args.top_p <= 1:
        raise ValueError("--max_new_tokens and --batch_size must be >= 1, --max_questions >= 0, --temperature >= 0 "
                         "and --top_p in (0, 1]")
    rows = read_rows(args.questions, split=args.questions_split, config_name=args.questions_config)
    rows = rows[: args.max_questions] if args.max_questions else rows
    model_path = resolve_model_path(args.model)
    name = args.name or Path(str(model_path)).name
    cuda = torch.cuda.is_available()
    dtype = ("bfloat16" if cuda else "float32") if args.dtype == "auto" else args.dtype
    model = load_causal_lm(model_path, dtype).to("cuda" if cuda else "cpu")
    answer = model_answer_fn(model, load_tokenizer(model_path), max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, seed=args.seed, top_p=args.top_p)
    if args.format == "alpaca_eval":
        records = alpaca_eval_outputs(rows, answer, generator=name, temperature=args.temperature or 0.0,
                                      source=args.questions)
        then = f"alpaca_eval --model_outputs {args.output}"
    else:
        records = mt_bench_answers(rows, answer, model_id=name, temperature=args.temperature, source=args.questions)
        then = ("copy it to FastChat's fastchat/llm_judge/data/mt_bench/model_answer/ and run "
                f"gen_judgment.py --model-list {name}")
    path = write_outputs(records, args.output, args.format)
    print(f"hypo export: {len(records)} answers of {name} in {path}\n  next: {then}")
    return 0


