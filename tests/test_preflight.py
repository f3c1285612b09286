"""A run's inputs are checked before any model loads or anything is written: data rows in every file,
the judge's name, the model paths."""

from __future__ import annotations

import pytest
from test_train import FAST

import hypo.models.loading
import hypo.training.setup
from hypo.config import HyPOConfig
from hypo.training.preflight import check_model_path
from hypo.training.trainer import train


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(hypo.training.setup, "load_policy_and_reference", refuse)
    monkeypatch.setattr(hypo.models.loading, "load_causal_lm", refuse)


def _config(tiny_model_dir, tiny_task, tmp_path, **overrides) -> HyPOConfig:
    values = {"model_name_or_path": str(tiny_model_dir), "dataset": str(tiny_task["pairs"]),
              "prompts": str(tiny_task["prompts"]), "eval_prompts": str(tiny_task["eval_prompts"]),
              "judge": "review-sentiment", "max_steps": 1, "output_dir": str(tmp_path / "run"), **FAST, **overrides}
    return HyPOConfig(**values)


def test_a_bad_row_in_the_held_out_prompts_stops_the_run_before_anything(tiny_model_dir, tiny_task, tmp_path,
                                                                         no_model_loads):
    lines = tiny_task["eval_prompts"].read_text().splitlines()
    bad = tmp_path / "eval.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"prompt": ""}'] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"eval\.jsonl: row 3: field 'prompt'"):
        train(_config(tiny_model_dir, tiny_task, tmp_path, eval_prompts=str(bad)))
    assert not (tmp_path / "run").exists()


def test_an_unknown_judge_stops_the_run_before_anything(tiny_model_dir, tiny_task, tmp_path, no_model_loads):
    with pytest.raises(ValueError, match="unknown judge 'gold'.*review-sentiment"):
        train(_config(tiny_model_dir, tiny_task, tmp_path, judge="gold"))
    assert not (tmp_path / "run").exists()


def test_a_missing_model_path_stops_the_run_before_anything(tiny_model_dir, tiny_task, tmp_path, no_model_loads):
    with pytest.raises(FileNotFoundError, match="ref_model_name_or_path: .*nope/ref does not exist"):
        train(_config(tiny_model_dir, tiny_task, tmp_path, ref_model_name_or_path=str(tmp_path / "nope" / "ref")))
    assert not (tmp_path / "run").exists()


def test_model_names_shaped_like_hub_ids_are_left_to_the_hub(tmp_path):
    check_model_path("Qwen/Qwen2.5-0.5B-Instruct", "model_name_or_path")
    check_model_path("gpt2", "model_name_or_path")
    for missing in ("./models/mine", "/abs/path/model", "weights.gguf", "a/b/c"):
        with pytest.raises(FileNotFoundError):
            check_model_path(missing, "model_name_or_path")


def test_a_checkpoint_as_the_model_of_a_new_run_is_flagged(tiny_model_dir, tiny_task, tmp_path, caplog):
    import logging

    run = train(_config(tiny_model_dir, tiny_task, tmp_path, method="dpo", max_steps=2, save_steps=1,
                        eval_at_end=False))
    checkpoint = run.output_dir / "checkpoint-1"
    with caplog.at_level(logging.WARNING, logger="hypo.training.preflight"):
        train(_config(checkpoint, tiny_task, tmp_path, method="dpo", max_steps=1, eval_at_end=False,
                      output_dir=str(tmp_path / "new")))
    assert f"--ref_model_name_or_path {tiny_model_dir}" in caplog.text and "--resume_from_checkpoint" in caplog.text
