"""The bundled default task "reviews": files, row format, counts, disjoint prompts, judge labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypo.evaluation.judges import get_judge
from hypo.tasks import DEFAULT_TASK, TaskFiles, available_tasks, get_task

PERSONAS = {"fan", "critic", "journalist", "blogger"}


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _user_text(row: dict) -> str:
    messages = row["prompt"]
    assert isinstance(messages, list) and len(messages) == 1
    (message,) = messages
    assert set(message) == {"role", "content"}
    assert message["role"] == "user"
    assert isinstance(message["content"], str) and message["content"].strip()
    return message["content"]


def _assistant_text(messages: list) -> str:
    assert isinstance(messages, list) and len(messages) == 1
    (message,) = messages
    assert set(message) == {"role", "content"}
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)
    assert message["content"] == message["content"].strip()
    return message["content"]


@pytest.fixture(scope="module")
def task() -> TaskFiles:
    return get_task()


@pytest.fixture(scope="module")
def pairs(task):
    return _rows(task.pairs)


def test_default_task(task):
    assert DEFAULT_TASK == "reviews"
    assert "reviews" in available_tasks()
    assert task == get_task("reviews")
    assert task.judge == "review-sentiment"
    for path in (task.pairs, task.prompts, task.eval_prompts):
        assert path.is_file() and path.parent.name == "reviews"
    assert (task.pairs.parent / "README.md").is_file()
    get_judge(task.judge)


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*reviews"):
        get_task("nope")


def test_counts(task, pairs):
    assert len(pairs) == 256
    assert len(_rows(task.prompts)) == 128
    assert len(_rows(task.eval_prompts)) == 64


def test_pair_rows(pairs):
    for row in pairs:
        assert set(row) == {
            "prompt",
            "chosen",
            "rejected",
            "chosen_score",
            "rejected_score",
            "chosen_behaviour",
            "rejected_behaviour",
        }
        _user_text(row)
        assert _assistant_text(row["chosen"]) != _assistant_text(row["rejected"])
        assert row["chosen_behaviour"] in PERSONAS and row["rejected_behaviour"] in PERSONAS
        assert row["chosen_behaviour"] != row["rejected_behaviour"]


def test_prompt_only_rows(task):
    for path in (task.prompts, task.eval_prompts):
        for row in _rows(path):
            assert set(row) == {"prompt"}
            _user_text(row)


def test_prompts_are_unique_and_disjoint(task, pairs):
    sets = []
    for rows in (pairs, _rows(task.prompts), _rows(task.eval_prompts)):
        texts = [_user_text(r) for r in rows]
        assert len(set(texts)) == len(texts)
        sets.append(set(texts))
    pair_prompts, online, held_out = sets
    assert not pair_prompts & online
    assert not pair_prompts & held_out
    assert not online & held_out


def test_judge_reproduces_labels(task, pairs):
    judge = get_judge(task.judge)
    for row in pairs:
        prompt = _user_text(row)
        chosen = judge.score(prompt, row["chosen"][0]["content"])
        rejected = judge.score(prompt, row["rejected"][0]["content"])
        assert chosen == pytest.approx(row["chosen_score"], abs=1e-12)
        assert rejected == pytest.approx(row["rejected_score"], abs=1e-12)
        assert chosen > rejected
