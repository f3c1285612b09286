"""The data of one training run: which sources and judge a config means, checking them, and loading them.

`run_sources` is the one place that decides it (the bundled task's files when `dataset` is not given, the
unlabeled prompts only for HyPO, the held-out prompts and pairs only when the run evaluates); the pre-flight
check (`check_run_sources`, before any model loads) and the loader (`load_training_data`) both read it, so
they check and load the same files. Rows handed over in memory (`InMemoryRows`: `HyPOTrainer`'s
`train_dataset=`, a `datasets.Dataset` or a list of dicts) are sources too, checked and loaded by the same
walk as a file's rows, their errors naming the dataset and the row (`train_dataset: row 7 (index 6): ...`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hypo.data.encoding import tokenize_preference_rows, tokenize_prompt_rows
from hypo.data.files import DataError, read_located_rows
from hypo.data.rows import (
    LoadReport,
    collect_rows,
    prepare_pair,
    prepare_prompt,
    prompts_from_preference_rows,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hypo.config import HyPOConfig


@dataclass(frozen=True)
class Source:
    """One data source of a run."""

    path: str  # a file, a dataset folder or a hub dataset name; for rows in memory, their name (train_dataset)
    split: str
    config_name: str | None  # the dataset's configuration (subset)
    kind: Literal["pairs", "prompts"]  # preference rows, or prompt-only rows
    rows: Sequence[Any] | None = None  # rows handed over in memory, read instead of `path`


@dataclass(frozen=True)
class InMemoryRows:
    """Rows handed over in memory, by role (`HyPOTrainer`'s datasets); None where the config's source applies."""

    pairs: Sequence[Any] | None = None  # train_dataset
    prompts: Sequence[Any] | None = None  # prompt_dataset
    eval_prompts: Sequence[Any] | None = None  # eval_prompts
    eval_pairs: Sequence[Any] | None = None  # eval_dataset


IN_MEMORY_NAMES = {"pairs": "train_dataset", "prompts": "prompt_dataset", "eval_prompts": "eval_prompts",
                   "eval_pairs": "eval_dataset"}
"""The name a role's in-memory rows go by in messages: `HyPOTrainer`'s argument."""


def in_memory_rows(value: Any, name: str) -> list[Any]:
    """The rows of a `datasets.Dataset` or a list (or tuple) of dicts handed over as `name`; anything else is a
    DataError naming it. Rows are not validated here (`check_source` does that, as for files)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(value, datasets.DatasetDict):
        raise DataError(f"{name}: a DatasetDict ({', '.join(value)}); pass one split, e.g. {name}=dataset['train']")
    if datasets is not None and isinstance(value, datasets.IterableDataset):
        raise DataError(f"{name}: an IterableDataset; hypo reads and checks every row before training, so pass a "
                        "Dataset (datasets.Dataset.from_list(list(iterable)))")
    if datasets is not None and isinstance(value, datasets.Dataset):
        return value.to_list()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise DataError(f"{name}: expected a datasets.Dataset, a list of dicts, or a path or hub name, got "
                    f"{type(value).__name__}")


def in_memory_fingerprints(given: InMemoryRows) -> dict[str, dict[str, Any]]:
    """For each role given in memory: its name, row count and a SHA-256 of its rows (as JSON), so that a resumed
    run can check that it was handed the same rows."""
    out = {}
    for role, name in IN_MEMORY_NAMES.items():
        rows = getattr(given, role)
        if rows is not None:
            text = json.dumps(list(rows), sort_keys=True, ensure_ascii=False, default=str)
            out[name] = {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return out


@dataclass(frozen=True)
class RunSources:
    """What a run reads; None where it reads nothing."""

    pairs: Source  # offline preference pairs
    prompts: Source | None  # HyPO's unlabeled prompts; None for DPO, or when they are the pairs' prompts
    prompts_from_pairs: bool  # HyPO without a prompt source: the distinct prompts of the pairs
    eval_prompts: Source | None  # held-out prompts (reverse KL, judged win rate), when the run evaluates
    eval_pairs: Source | None  # held-out pairs (eval_loss, eval_rewards/*), when the run evaluates
    judge: str | None  # the judge of the win rate: given, or the bundled task's gold judge


def run_sources(config: HyPOConfig, given: InMemoryRows | None = None) -> RunSources:
    """The sources and judge of a `HyPOConfig` and the rows `given` in memory: the bundled task's (`config.task`)
    unless pairs are given (`dataset`, or in memory), each with its split and configuration name. A role given
    in memory takes its rows; the config's path for that role must then be unset (`HyPOTrainer` checks)."""
    given = given or InMemoryRows()
    pairs, prompts, eval_prompts, judge = config.dataset, config.prompts, config.eval_prompts, config.judge
    if pairs is None and given.pairs is None:
        from hypo.tasks import get_task

        task = get_task(config.task)
        pairs, judge = str(task.pairs), judge or task.judge
        prompts, eval_prompts = prompts or str(task.prompts), eval_prompts or str(task.eval_prompts)
    online = config.method == "hypo"
    evaluates = config.eval_at_end or config.eval_steps > 0

    def source(role: str, path: str | None, split: str, config_name: str | None, kind) -> Source | None:
        rows = getattr(given, role)
        if rows is not None:
            return Source(IN_MEMORY_NAMES[role], split, None, kind, rows)
        return Source(path, split, config_name, kind) if path else None

    prompt_source = source("prompts", prompts, config.prompts_split, config.prompts_config, "prompts")
    return RunSources(
        pairs=source("pairs", pairs, config.dataset_split, config.dataset_config, "pairs"),
        prompts=prompt_source if online else None,
        prompts_from_pairs=online and prompt_source is None,
        eval_prompts=source("eval_prompts", eval_prompts, config.eval_prompts_split, config.eval_prompts_config,
                            "prompts") if evaluates else None,
        eval_pairs=source("eval_pairs", config.eval_dataset, config.eval_dataset_split, config.eval_dataset_config,
                          "pairs") if evaluates else None,
        judge=judge,
    )


def read_source(source: Source) -> tuple[list[Any], list[str]]:
    """The rows of `source` and where each one is: `<file>: row <n>` for files (unreadable rows as DataError
    instances, see `read_located_rows`), `<name>: row <n> (index <n - 1>)` for rows in memory."""
    if source.rows is not None:
        return list(source.rows), [f"{source.path}: row {n + 1} (index {n})" for n in range(len(source.rows))]
    return read_located_rows(source.path, split=source.split, strict=False, config_name=source.config_name)


def check_source(source: Source, *, skip_bad_rows: bool) -> LoadReport:
    """Read and validate every row of `source` without a tokenizer or a model (raises `DataError`): the walk of
    the tokenizing load (`collect_rows`), with the same messages."""
    rows, wheres = read_source(source)
    prepare = prepare_pair if source.kind == "pairs" else prepare_prompt
    return collect_rows(rows, prepare, None, source=source.path, wheres=wheres, skip_bad_rows=skip_bad_rows)[1]


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


def load_training_data(config: HyPOConfig, tokenizer: PreTrainedTokenizerBase,
                       given: InMemoryRows | None = None) -> TrainingData:
    """Tokenized pairs, unlabeled prompts, held-out prompts and held-out pairs of a `HyPOConfig` (and the rows
    `given` in memory), from the sources `run_sources` names."""
    sources = run_sources(config, given)
    lengths = {"max_prompt_length": config.max_prompt_length, "skip_bad_rows": config.skip_bad_rows}
    pair_lengths = {**lengths, "max_length": config.max_length, "max_completion_length": config.max_completion_length}

    def load(source: Source | None) -> list[dict] | None:
        if source is None:
            return None
        rows, wheres = read_source(source)
        tokenize = tokenize_preference_rows if source.kind == "pairs" else tokenize_prompt_rows
        options = pair_lengths if source.kind == "pairs" else lengths
        return tokenize(rows, tokenizer, source=source.path, row_locations=wheres, **options)[0]

    pairs = load(sources.pairs)
    prompts = load(sources.prompts)
    if sources.prompts_from_pairs:
        prompts, _ = tokenize_prompt_rows(prompts_from_preference_rows(pairs), tokenizer, source=sources.pairs.path,
                                          **lengths)
    eval_pairs = load(sources.eval_pairs)
    if eval_pairs is not None and config.eval_max_pairs:
        eval_pairs = eval_pairs[: config.eval_max_pairs]
    return TrainingData(pairs, prompts, load(sources.eval_prompts), sources.judge, eval_pairs)
