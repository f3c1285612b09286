"""Config validation, file loading and CLI overrides."""

import json

import pytest

from hypo.cli import parse_train_args
from hypo.config import HyPOConfig, read_config_file, save_config


def test_defaults_are_valid_and_name_the_paper_lambda():
    config = HyPOConfig()
    assert config.method == "hypo" and config.kl_coef > 0 and config.beta == 0.1
    assert config.eval_temperature == 1.0 and config.eval_top_p == 1.0 and config.cache_implementation == "auto"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"beta": 0}, "beta must be > 0"),
    ({"kl_coef": -1}, "kl_coef must be >= 0"),
    ({"method": "ppo"}, "method must be"),
    ({"eval_temperature": 0}, "eval_temperature must be > 0 and eval_top_p in (0, 1]"),
    ({"eval_top_p": 1.5}, "eval_temperature must be > 0 and eval_top_p in (0, 1]"),
    ({"cache_implementation": "paged"}, "cache_implementation must be 'auto', 'dynamic' or 'static'"),
    ({"max_prompt_length": 300, "max_length": 256}, "max_prompt_length (300) must be < max_length (256)"),
    ({"num_generations": 0}, "num_generations must be >= 1"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to the sigmoid loss only"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
])
def test_invalid_values_are_reported(overrides, message):
    with pytest.raises(ValueError, match="invalid configuration") as info:
        HyPOConfig(**overrides)
    assert message in str(info.value)


def test_tempered_evaluation_sampling_is_allowed_for_hypo():
    """Only the judged evaluation completions are tempered; the online KL samples have no such option."""
    config = HyPOConfig(method="hypo", eval_temperature=0.7, eval_top_p=0.9)
    assert (config.eval_temperature, config.eval_top_p) == (0.7, 0.9)
    assert not hasattr(config, "temperature") and not hasattr(config, "top_p")


def test_one_generation_warns_about_missing_baseline():
    with pytest.warns(UserWarning, match="no baseline"):
        HyPOConfig(num_generations=1)


def test_yaml_file_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: dpo\nbeta: 0.25\nmax_steps: 7\nuse_peft: true\n")
    config = parse_train_args(["--config", str(path), "--beta", "0.5"])
    assert (config.method, config.beta, config.max_steps, config.use_peft) == ("dpo", 0.5, 7, True)


def test_json_config_and_unknown_keys(tmp_path):
    good = tmp_path / "run.json"
    good.write_text(json.dumps({"kl_coef": 0.2}))
    assert read_config_file(good) == {"kl_coef": 0.2}
    bad = tmp_path / "bad.yaml"
    bad.write_text("betta: 0.1\nkl_coef: 0.2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option\(s\): betta"):
        read_config_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        read_config_file(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    config = HyPOConfig(method="dpo", beta=0.3, output_dir=str(tmp_path))
    path = save_config(config, tmp_path)
    assert HyPOConfig(**json.loads(path.read_text())) == config
