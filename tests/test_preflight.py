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


# --------------------------------------------------------------------------- rows per batch, before any model


def _lines(path, count: int, tmp_path, name: str):
    """The first `count` rows of `path` in a file of their own."""
    out = tmp_path / name
    out.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:count]))
    return out


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "run").exists()  # no run folder: no config.json, no weights


def test_fewer_pairs_than_one_batch_stop_the_run_before_anything(tiny_model_dir, tiny_task, tmp_path, no_model_loads):
    pairs = _lines(tiny_task["pairs"], 1, tmp_path, "one_pair.jsonl")
    with pytest.raises(ValueError, match=r"one_pair\.jsonl: 1 usable pairs are fewer than one batch on each process: "
                                         r"per_device_train_batch_size 2 x 1 process\(es\) = 2"):
        train(_config(tiny_model_dir, tiny_task, tmp_path, dataset=str(pairs), method="dpo"))
    _assert_nothing_written(tmp_path)


def test_fewer_prompts_than_one_batch_stop_the_run_before_anything(tiny_model_dir, tiny_task, tmp_path,
                                                                   no_model_loads):
    prompts = _lines(tiny_task["prompts"], 1, tmp_path, "one_prompt.jsonl")
    with pytest.raises(ValueError, match=r"one_prompt\.jsonl: 1 usable prompts are fewer than one batch .*"
                                         r"per_device_prompt_batch_size 2 x 1 process\(es\) = 2"):
        train(_config(tiny_model_dir, tiny_task, tmp_path, prompts=str(prompts)))
    _assert_nothing_written(tmp_path)


def test_fewer_distinct_prompts_of_the_pairs_than_one_batch_stop_the_run(tiny_model_dir, tiny_task, tmp_path,
                                                                        no_model_loads):
    """HyPO without a prompt file takes the distinct prompts of the pairs: 4 pairs of 1 prompt are 1 prompt."""
    import json

    row = json.loads(tiny_task["pairs"].read_text().splitlines()[0])
    same = tmp_path / "same_prompt.jsonl"
    same.write_text("".join(json.dumps({**row, "chosen": [{"role": "assistant", "content": f"Good {i}."}]}) + "\n"
                            for i in range(4)))
    values = {k: v for k, v in _config(tiny_model_dir, tiny_task, tmp_path).to_dict().items() if k != "prompts"}
    with pytest.raises(ValueError, match=r"same_prompt\.jsonl \(the distinct prompts of its pairs\): 1 usable "
                                         "prompts are fewer than one batch"):
        train(HyPOConfig(**{**values, "dataset": str(same)}))
    _assert_nothing_written(tmp_path)


def test_what_the_tokenizer_refuses_stops_the_run_before_any_model(tiny_model_dir, tiny_task, tmp_path,
                                                                    no_model_loads):
    """The tokenizer (not the model) runs in the checks: conversational data for a tokenizer without a chat
    template is refused before any model loads."""
    from transformers import AutoTokenizer

    plain = tmp_path / "no_template"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    with pytest.raises(ValueError, match=r"pairs\.jsonl: the data is conversational but the tokenizer has no chat "
                                         "template"):
        train(_config(plain, tiny_task, tmp_path, method="dpo"))
    _assert_nothing_written(tmp_path)


def test_rows_per_batch_count_every_process(tiny_model_dir, tiny_task, tmp_path, no_model_loads, monkeypatch):
    from hypo.training.preflight import check_run_inputs

    config = _config(tiny_model_dir, tiny_task, tmp_path, per_device_train_batch_size=3)
    check_run_inputs(config, num_processes=2)  # 8 pairs >= 3 x 2, 8 prompts >= 2 x 2
    with pytest.raises(ValueError, match=r"pairs\.jsonl: 8 usable pairs .* per_device_train_batch_size 3 x 3 "
                                         r"process\(es\) = 9"):
        check_run_inputs(config, num_processes=3)
    monkeypatch.setenv("WORLD_SIZE", "5")  # the launcher's count when none is given
    with pytest.raises(ValueError, match=r"prompts\.jsonl: 8 usable prompts .* 2 x 5 process\(es\) = 10"):
        check_run_inputs(HyPOConfig(**{**config.to_dict(), "per_device_train_batch_size": 1}))
    _assert_nothing_written(tmp_path)


def test_fewer_held_out_pairs_than_processes_stop_the_run_before_anything(tiny_model_dir, tiny_task, tmp_path,
                                                                         no_model_loads):
    from hypo.training.preflight import check_run_inputs

    config = _config(tiny_model_dir, tiny_task, tmp_path, eval_dataset=str(tiny_task["pairs"]),
                     eval_dataset_split="train", eval_max_pairs=1)
    check_run_inputs(config, num_processes=1)
    with pytest.raises(ValueError, match=r"pairs\.jsonl: 1 usable held-out pairs \(eval_max_pairs 1\) for 2 "
                                         "processes"):
        check_run_inputs(config, num_processes=2)
    _assert_nothing_written(tmp_path)


def test_lora_with_a_separate_reference_stops_the_run_before_anything(tiny_model_dir, tiny_task, tmp_path,
                                                                      no_model_loads):
    with pytest.raises(ValueError, match="LoRA takes the base model with adapters disabled as the reference"):
        train(_config(tiny_model_dir, tiny_task, tmp_path, use_peft=True, ref_model_name_or_path=str(tiny_model_dir)))
    _assert_nothing_written(tmp_path)
