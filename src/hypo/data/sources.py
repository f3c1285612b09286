"""The data of one training run: which sources and judge a config means, checking them, and loading them.

`run_sources` is the one place that decides it (the bundled task's files when `dataset` is not given, the
unlabeled prompts only for HyPO, the held-out prompts and pairs only when the run evaluates); the pre-flight
check (`check_run_sources`, before any model loads) and the loader (`load_training_data`) both read it, so
they check and load the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hypo.data.encoding import load_preference_data, load_prompt_data, tokenize_prompt_rows
from hypo.data.rows import (
    LoadReport,
    check_preference_source,
    check_prompt_source,
    prompts_from_preference_rows,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hypo.config import HyPOConfig


@dataclass(frozen=True)
class Source:
    """One data source of a run."""

    path: str  # a file, a dataset folder or a hub dataset name
    split: str
    config_name: str | None  # the dataset's configuration (subset)
    kind: Literal["pairs", "prompts"]  # preference rows, or prompt-only rows


@dataclass(frozen=True)
class RunSources:
    """What a run reads; None where it reads nothing."""

    pairs: Source  # offline preference pairs
    prompts: Source | None  # HyPO's unlabeled prompts; None for DPO, or when they are the pairs' prompts
    prompts_from_pairs: bool  # HyPO without a prompt source: the distinct prompts of the pairs
    eval_prompts: Source | None  # held-out prompts (reverse KL, judged win rate), when the run evaluates
    eval_pairs: Source | None  # held-out pairs (eval_loss, eval_rewards/*), when the run evaluates
    judge: str | None  # the judge of the win rate: given, or the bundled task's gold judge


def run_sources(config: HyPOConfig) -> RunSources:
    """The sources and judge of a `HyPOConfig`: the bundled task's (`config.task`) unless `dataset` is given,
    each with its split and configuration name."""
    pairs, prompts, eval_prompts, judge = config.dataset, config.prompts, config.eval_prompts, config.judge
    if pairs is None:
        from hypo.tasks import get_task

        task = get_task(config.task)
        pairs, judge = str(task.pairs), judge or task.judge
        prompts, eval_prompts = prompts or str(task.prompts), eval_prompts or str(task.eval_prompts)
    online = config.method == "hypo"
    evaluates = config.eval_at_end or config.eval_steps > 0
    return RunSources(
        pairs=Source(pairs, config.dataset_split, config.dataset_config, "pairs"),
        prompts=Source(prompts, config.prompts_split, config.prompts_config, "prompts") if online and prompts
        else None,
        prompts_from_pairs=online and not prompts,
        eval_prompts=Source(eval_prompts, config.eval_prompts_split, config.eval_prompts_config, "prompts")
        if evaluates and eval_prompts else None,
        eval_pairs=Source(config.eval_dataset, config.eval_dataset_split, config.eval_dataset_config, "pairs")
        if evaluates and config.eval_dataset else None,
        judge=judge,
    )


def check_source(source: Source, *, skip_bad_rows: bool) -> LoadReport:
    """Read and validate every row of `source` without a tokenizer or a model (raises `DataError`)."""
    check = check_preference_source if source.kind == "pairs" else check_prompt_source
    return check(source.path, split=source.split, config_name=source.config_name, skip_bad_rows=skip_bad_rows)


def check_run_sources(sources: RunSources, *, skip_bad_rows: bool) -> dict[str, LoadReport]:
    """Every row of every source a run reads, checked before anything heavy loads; the reports by role."""
    roles = {"pairs": sources.pairs, "prompts": sources.prompts, "eval_prompts": sources.eval_prompts,
             "eval_pairs": sources.eval_pairs}
    return {role: check_source(source, skip_bad_rows=skip_bad_rows) for role, source in roles.items() if source}


@dataclass
class TrainingData:
    pairs: list[dict]
    prompts: list[dict] | None  # unlabeled prompts for the online term (HyPO only)
    eval_prompts: list[dict] | None
    judge: str | None
    eval_pairs: list[dict] | None = None  # held-out pairs (config.eval_dataset) for eval_loss, eval_rewards/*


def load_training_data(config: HyPOConfig, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """Tokenized pairs, unlabeled prompts, held-out prompts and held-out pairs of a `HyPOConfig`, from the
    sources `run_sources` names."""
    sources = run_sources(config)
    lengths = {"max_prompt_length": config.max_prompt_length, "skip_bad_rows": config.skip_bad_rows}
    pair_lengths = {**lengths, "max_length": config.max_length, "max_completion_length": config.max_completion_length}

    def load(source: Source | None) -> list[dict] | None:
        if source is None:
            return None
        read = load_preference_data if source.kind == "pairs" else load_prompt_data
        options = pair_lengths if source.kind == "pairs" else lengths
        return read(source.path, tokenizer, split=source.split, config_name=source.config_name, **options)[0]

    pairs = load(sources.pairs)
    prompts = load(sources.prompts)
    if sources.prompts_from_pairs:
        prompts, _ = tokenize_prompt_rows(prompts_from_preference_rows(pairs), tokenizer, source=sources.pairs.path,
                                          **lengths)
    eval_pairs = load(sources.eval_pairs)
    if eval_pairs is not None and config.eval_max_pairs:
        eval_pairs = eval_pairs[: config.eval_max_pairs]
    return TrainingData(pairs, prompts, load(sources.eval_prompts), sources.judge, eval_pairs)
