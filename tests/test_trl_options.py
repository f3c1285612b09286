"""TRL's script options in `hypo train` and `hypo sft`: the aliases give hypo's options, in flags and in `--config`
files; options without a meaning here are refused with a reason; the README and `--help` list every one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hypo.cli.train import parse_config_args, parse_train_args, sft_parser, train_parser
from hypo.cli.trl_options import TRL_OPTIONS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_trl_dpo_script_flags_give_hypos_options():
    config = parse_train_args([
        "--dataset_name", "trl-lib/ultrafeedback_binarized", "--dataset_config", "default",
        "--dataset_train_split", "train_prefs", "--dataset_test_split", "test_prefs", "--torch_dtype", "float32",
        "--bf16", "--eval_strategy", "steps", "--logging_steps", "5", "--lora_target_modules", "q_proj", "v_proj",
        "--report_to", "tensorboard", "wandb", "--warmup_steps", "3", "--max_steps", "30", "--no_remove_unused_columns",
        "--optim", "adamw_torch", "--adam_beta2", "0.999", "--model_revision", "main"])
    assert (config.dataset, config.dataset_config, config.dataset_split) == \
        ("trl-lib/ultrafeedback_binarized", "default", "train_prefs")
    assert (config.eval_dataset, config.eval_dataset_split, config.eval_dataset_config) == \
        ("trl-lib/ultrafeedback_binarized", "test_prefs", "default")
    assert (config.mixed_precision, config.eval_steps, config.dtype) == ("bf16", 5, "float32")
    assert (config.lora_target_modules, config.report_to) == ("q_proj,v_proj", "tensorboard,wandb")
    assert config.warmup_ratio == pytest.approx(0.1)  # 3 of 30 steps


@pytest.mark.parametrize(("argv", "expected"), [
    (["--bf16", "false"], {"mixed_precision": "no"}),
    (["--fp16=true"], {"mixed_precision": "fp16"}),
    (["--eval_strategy", "no"], {"eval_steps": 0, "eval_at_end": False}),
    (["--eval_strategy", "steps", "--eval_steps", "7"], {"eval_steps": 7}),
    (["--save_strategy", "steps"], {"save_steps": 500}),
    (["--save_strategy", "no"], {"save_steps": 0}),
    (["--warmup_steps", "0.25"], {"warmup_ratio": 0.25}),
    (["--no_gradient_checkpointing"], {"gradient_checkpointing": False}),
    (["--disable_dropout", "true"], {}),
])
def test_value_mapped_options(argv, expected):
    config = parse_train_args(argv)
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["--dataset_name", "a", "--dataset", "b"], r"--dataset_name \(TRL's name\) sets --dataset, which is given too"),
    (["--save_strategy", "no", "--save_steps", "9"], "--save_strategy .* sets --save_steps, which is given too"),
    (["--dataset_test_split", "test"], "--dataset_test_split is a split of --dataset_name"),
    (["--eval_strategy", "epoch"], "no epoch-based evaluation"),
    (["--save_strategy", "best"], "no epoch or best saves"),
    (["--warmup_steps", "40"], r"warmup_ratio.*max_steps > 40 \(max_steps is 30\)"),
    (["--load_in_4bit"], "quantized training is not supported"),
    (["--dataset_streaming"], "streaming is not supported"),
    (["--disable_dropout", "false"], "hypo always disables dropout"),
    (["--optim", "adafactor"], "torch's AdamW"),
    (["--load_best_model_at_end"], "target_kl"),
    (["--model_revision", "v2"], "default revision"),
    (["--lr_scheduler_kwargs", "{}"], "TRL / transformers option.*that hypo does not take"),
    (["--not_an_option", "1"], r"unrecognized arguments: --not_an_option 1$"),
])
def test_options_without_a_meaning_here_are_refused_with_the_reason(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_train_args(argv)


def test_trl_names_in_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset_name: pairs.jsonl\ndataset_train_split: train\nbf16: false\nlogging_steps: 2\n"
                    "eval_strategy: steps\nlora_target_modules: [q_proj, k_proj]\n")
    config = parse_train_args(["--config", str(path)])
    assert (config.dataset, config.mixed_precision, config.eval_steps, config.lora_target_modules) == \
        ("pairs.jsonl", "no", 2, "q_proj,k_proj")
    assert parse_train_args(["--config", str(path), "--eval_steps", "4"]).eval_steps == 4  # flags win
    path.write_text("dataset_name: a.jsonl\ndataset: b.jsonl\n")
    with pytest.raises(ValueError, match=r"run.yaml: --dataset_name \(TRL's name\) sets --dataset, which is given"):
        parse_train_args(["--config", str(path)])


def test_hypo_sft_takes_the_trl_names_it_has_a_meaning_for():
    from hypo.training.sft import SFTRunConfig

    config = parse_config_args(sft_parser(), SFTRunConfig, [
        "--dataset_name", "trl-lib/Capybara", "--dataset_train_split", "train", "--bf16", "--use_peft",
        "--lora_dropout", "0.05", "--lora_target_modules", "q_proj", "v_proj", "--eval_strategy", "no"])
    assert (config.dataset, config.mixed_precision, config.lora_dropout, config.lora_target_modules) == \
        ("trl-lib/Capybara", "bf16", 0.05, "q_proj,v_proj")
    for trl_only in (["--dataset_test_split", "test"], ["--eval_strategy", "steps"]):  # hypo sft does not evaluate
        with pytest.raises(ValueError, match="this command has no eval_"):
            parse_config_args(sft_parser(), SFTRunConfig, ["--dataset_name", "d", *trl_only])
    assert "--dataset_test_split" not in sft_parser().format_help()


def test_trl_names_that_are_hypos_own_options_are_only_the_translated_ones():
    """A TRL name that is also a hypo option must translate its value (TRL's list form, TRL's "all"), never refuse
    or shadow what hypo itself offers (attn_implementation was refused here after hypo had gained it)."""
    import dataclasses

    from hypo.config import HyPOConfig

    shared = set(TRL_OPTIONS) & {f.name for f in dataclasses.fields(HyPOConfig)}
    assert shared == {"lora_target_modules", "report_to"}
    assert parse_train_args(["--attn_implementation", "sdpa"]).attn_implementation == "sdpa"


def test_readme_and_help_list_every_trl_option():
    readme, help_text = README.read_text(), train_parser().format_help()
    for name, option in TRL_OPTIONS.items():
        assert re.search(rf"`--{name}[` ]", readme), name  # in a code span, alone or with its value
        assert f"--{name}: {option.doc}" in help_text, name
