"""The command line: help lists every option, bad input is a clear error with no traceback."""

import dataclasses
import json

import pytest

from hypo.cli.evaluate import eval_parser
from hypo.cli.main import main, normalize_flags
from hypo.cli.train import train_parser
from hypo.config import HyPOConfig


def test_train_help_lists_every_option():
    text = train_parser().format_help()
    for f in dataclasses.fields(HyPOConfig):
        assert f"--{f.name}" in text, f.name
        assert f.metadata["help"].split()[0] in text


def test_top_level_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "hypo train" in capsys.readouterr().out
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_bad_row_is_reported_with_file_row_and_field(tmp_path, tiny_model_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    code = main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(pairs), "--method", "dpo",
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "pairs.jsonl: row 2: field 'chosen'" in err and "Traceback" not in err


def test_every_command_takes_both_flag_spellings():
    assert normalize_flags(["--max-steps", "3", "--output-dir=a-b", "-x", "--", "--keep-this"]) == \
        ["--max_steps", "3", "--output_dir=a-b", "-x", "--", "--keep-this"]


def test_eval_defaults_are_the_training_runs_evaluation_settings():
    args, config = eval_parser().parse_args(["--model", "m"]), HyPOConfig()
    assert (args.num_samples, args.max_prompts, args.max_new_tokens, args.max_prompt_length, args.batch_size,
            args.seed, args.task) == (config.eval_num_samples, config.eval_max_prompts, config.max_completion_length,
                                      config.max_prompt_length, config.eval_batch_size, config.seed, config.task)


def test_invalid_option_value_is_reported(capsys, tmp_path):
    assert main(["train", "--beta", "-1", "--output_dir", str(tmp_path)]) == 2
    assert "beta must be > 0" in capsys.readouterr().err


def test_eval_command_writes_results(tiny_model_dir, tiny_task, tmp_path, capsys):
    """The policy is its own reference here, so every log-ratio is exactly 0."""
    code = main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
                 "--prompts", str(tiny_task["eval_prompts"]), "--judge", "review-sentiment", "--max-prompts", "2",
                 "--num-samples", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path)])
    assert code == 0
    metrics = json.loads((tmp_path / "eval_results.json").read_text())["metrics"]
    assert metrics["objective/kl"] == 0.0 and metrics["num_completions"] == 4
    assert "gold win rate" in capsys.readouterr().out


def test_command_line_reexecutes_once_with_tuned_malloc(monkeypatch):
    """`hypo` re-executes itself with the glibc malloc settings (read only at process start), unless the
    user chose their own or opted out; calls from Python (`main(argv)`) never re-execute."""
    import platform
    import sys

    from hypo.cli import main as cli

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the malloc settings are glibc's")
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, args, env: calls.append((path, args, env)))
    monkeypatch.setattr(sys, "argv", ["hypo", "train", "--max_steps", "3"])
    for key in [*cli.MALLOC_SETTINGS, "HYPO_NO_MALLOC_TUNING"]:
        monkeypatch.delenv(key, raising=False)
    cli.reexec_with_tuned_malloc()
    path, args, env = calls.pop()
    assert path == sys.executable and args[1:] == ["-m", "hypo.cli", "train", "--max_steps", "3"]
    assert all(env[k] == v for k, v in cli.MALLOC_SETTINGS.items())
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    cli.reexec_with_tuned_malloc()
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("HYPO_NO_MALLOC_TUNING", "1")
    cli.reexec_with_tuned_malloc()
    assert calls == []
