"""Bundled tasks: offline preference pairs, online prompts, held-out prompts and a gold judge.

Each task is a folder next to this file holding `pairs.jsonl`, `prompts.jsonl`,
`eval_prompts.jsonl` and a `README.md` data card. The default run uses `DEFAULT_TASK`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_TASK", "TASK_JUDGES", "TaskFiles", "available_tasks", "get_task", "task_judges"]

DEFAULT_TASK = "reviews"

TASK_JUDGES: dict[str, str] = {"reviews": "review-sentiment"}
"""Gold judge name (see `hypo.evaluation.judges.get_judge`) of each bundled task."""


def task_judges() -> dict:
    """The bundled tasks' gold judges: name -> factory (each lives with its task)."""
    from hypo.tasks.reviews.judge import ReviewSentimentJudge

    return {ReviewSentimentJudge.name: ReviewSentimentJudge}

_FILES = ("pairs.jsonl", "prompts.jsonl", "eval_prompts.jsonl")


@dataclass(frozen=True)
class TaskFiles:
    """Paths of a bundled task's data files and the name of its gold judge."""

    pairs: Path
    prompts: Path
    eval_prompts: Path
    judge: str


def _task_root() -> Path:
    return Path(__file__).parent


def available_tasks() -> list[str]:
    """Names of the bundled tasks, sorted."""
    return sorted(TASK_JUDGES)


def get_task(name: str = DEFAULT_TASK) -> TaskFiles:
    """Files of the bundled task `name` (default: "reviews")."""
    if name not in TASK_JUDGES:
        raise ValueError(f"unknown task {name!r}; bundled tasks: {', '.join(available_tasks())}")
    folder = _task_root() / name
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"task {name!r} is missing {', '.join(missing)} in {folder}")
    return TaskFiles(
        pairs=folder / "pairs.jsonl",
        prompts=folder / "prompts.jsonl",
        eval_prompts=folder / "eval_prompts.jsonl",
        judge=TASK_JUDGES[name],
    )
