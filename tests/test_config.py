"""Config validation, file loading and CLI overrides."""

import dataclasses
import json
import math

import pytest

from hypo.cli.train import parse_train_args
from hypo.config import HyPOConfig, read_config_file, save_config


def test_the_defaults_are_valid_and_warn_about_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HyPOConfig()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"beta": 0}, "beta must be > 0"),
    ({"kl_coef": -1}, "kl_coef must be >= 0"),
    ({"method": "ppo"}, "method must be one of 'hypo', 'dpo', got 'ppo' (str)"),
    ({"loss_type": "hinge2"}, "loss_type must be one of"),
    ({"vllm_mode": "remote"}, "vllm_mode must be one of 'server', 'colocate', got 'remote' (str)"),
    ({"eval_temperature": 0}, "eval_temperature must be > 0 and eval_top_p in (0, 1]"),
    ({"eval_top_p": 1.5}, "eval_temperature must be > 0 and eval_top_p in (0, 1]"),
    ({"cache_implementation": "paged"}, "cache_implementation must be one of 'auto', 'dynamic', 'static'"),
    ({"max_prompt_length": 300, "max_length": 256}, "max_prompt_length (300) must be < max_length (256)"),
    ({"num_generations": 0}, "num_generations must be >= 1"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to aot, aot_unpaired, exo_pair, robust, "
                                                   "sigmoid; loss_type is ipo"),
    ({"loss_type": ["sigmoid", "dpo"]}, "loss_type must be one of 'sigmoid', 'hinge', 'ipo'"),
    ({"loss_type": []}, "loss_type must be one of"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights has 1 weight(s) for 2 loss type(s)"),
    ({"loss_type": "exo_pair"}, "loss_type exo_pair needs label_smoothing > 0"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5), got 0.5"),
    ({"loss_type": ["sigmoid", "aot"], "f_divergence_type": "js_divergence"}, "f_divergence_type js_divergence "
                                                                             "applies to discopop, exo_pair"),
    ({"f_divergence_type": "hellinger"}, "f_divergence_type must be one of 'reverse_kl'"),
    ({"loss_type": "discopop", "discopop_tau": 0}, "discopop_tau must be > 0"),
    ({"ld_alpha": 1.5}, "ld_alpha must be in [0, 1], got 1.5"),
    ({"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5}, "ld_alpha with loss_type sft is not offered"),
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


def test_config_warnings_point_at_the_line_that_made_the_config():
    """Not at the dataclass's generated __init__ (`<string>`): the user's own line."""
    import inspect

    with pytest.warns(UserWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        HyPOConfig(num_generations=1, dtype="bfloat16")
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)] * 2


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


def test_an_option_of_an_earlier_version_names_its_new_name(tmp_path):
    old = tmp_path / "config.json"
    old.write_text(json.dumps({"kl_coef": 0.2, "temperature": 0.7}))
    with pytest.raises(ValueError, match=r"config.json: unknown option\(s\): temperature \(temperature is now "
                                         r"eval_temperature"):
        read_config_file(old)


def test_loss_types_and_weights_from_python_flags_and_files(tmp_path):
    """TRL's spellings: one name or a list; on the command line several values after one flag (TRL's nargs)."""
    assert HyPOConfig(loss_type="ipo").loss_types == ["ipo"]
    config = HyPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    assert (config.loss_types, config.loss_weights) == (["sigmoid", "sft"], [1.0, 0.2])
    config = parse_train_args(["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.2"])
    assert (config.loss_types, config.loss_weights) == (["sigmoid", "sft"], [1.0, 0.2])
    assert parse_train_args(["--loss_type", "ipo"]).loss_types == ["ipo"]
    path = tmp_path / "run.yaml"
    path.write_text("loss_type: [robust, sft]\nloss_weights: [1, 0.5]\nlabel_smoothing: 0.1\n")
    config = parse_train_args(["--config", str(path)])
    assert (config.loss_types, config.loss_weights, config.label_smoothing) == (["robust", "sft"], [1, 0.5], 0.1)
    path.write_text("loss_type: [robust, 3]\n")
    with pytest.raises(ValueError, match="option 'loss_type': loss_type must be a string or a list"):
        parse_train_args(["--config", str(path)])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        parse_train_args(["--loss_type", "sigmoid", "simpo"])


def test_saved_config_round_trips(tmp_path):
    config = HyPOConfig(method="dpo", beta=0.3, output_dir=str(tmp_path))
    path = save_config(config, tmp_path)
    assert HyPOConfig(**json.loads(path.read_text())) == config


# --------------------------------------------------------------------------- types from the annotations

WRONG_TYPES = [
    ("max_steps", 1.5), ("max_steps", "7"), ("max_steps", [7]), ("max_steps", True), ("max_steps", None),
    ("per_device_train_batch_size", 2.0), ("seed", False),
    ("beta", "0.1"), ("beta", [0.1]), ("beta", True), ("beta", None), ("beta", {"value": 0.1}),
    ("use_peft", 1), ("use_peft", "true"), ("eval_at_end", None),
    ("model_name_or_path", 3), ("model_name_or_path", None), ("report_to", ["wandb"]), ("report_to", False),
    ("dataset", 5), ("dataset", ["a.jsonl"]), ("gguf_file", 1.0),
    ("num_threads", 1.5), ("num_threads", "2"), ("num_threads", True),
    ("method", "HYPO"), ("method", 1), ("method", None), ("loss_type", 3), ("loss_type", ["sigmoid", 1]),
    ("loss_type", ("sigmoid", "sft")), ("loss_weights", 0.5), ("loss_weights", [1.0, "0.2"]), ("dtype", "float64"),
    ("lr_scheduler_type", True),
]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES)
def test_values_must_match_the_field_annotation(name, value):
    with pytest.raises(ValueError, match="invalid configuration") as info:
        HyPOConfig(**{name: value})
    assert f"{name} must be " in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(HyPOConfig) if f.type == "float"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_must_be_finite(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number, got {value!r}"):
        HyPOConfig(**{name: value})


def test_right_types_pass_and_ints_become_floats():
    config = HyPOConfig(beta=1, kl_coef=0, num_train_epochs=2, num_threads=2, dataset=None, dtype="auto")
    assert (config.beta, config.kl_coef, config.num_train_epochs) == (1.0, 0.0, 2.0)
    assert all(type(v) is float for v in (config.beta, config.kl_coef, config.num_train_epochs))
    assert config.num_threads == 2 and HyPOConfig(num_threads=None).num_threads is None
    numpy = pytest.importorskip("numpy")
    config = HyPOConfig(max_steps=numpy.int64(3), num_threads=numpy.int32(2), beta=numpy.float32(0.5))
    assert (type(config.max_steps), type(config.num_threads), type(config.beta)) == (int, int, float)
    json.dumps(config.to_dict())  # plain Python numbers: the saved config.json stays valid
    with pytest.raises(ValueError, match="use_peft must be true or false"):
        HyPOConfig(use_peft=numpy.bool_(True))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ({"num_threads": 0}, "num_threads must be >= 1 when set, got 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"method": "dpo", "eval_temperature": 0.0}, "eval_temperature must be > 0"),
    ({"method": "dpo", "eval_top_p": 1.5}, "eval_top_p in (0, 1]"),
    ({"lora_r": 0}, "lora_r must be >= 1, got 0"),
    ({"lora_alpha": 0}, "lora_alpha must be >= 1, got 0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
    ({"save_steps": -1}, "save_steps must be >= 0"),
    ({"eval_max_prompts": -1}, "eval_max_prompts must be >= 0"),
    ({"ddp_timeout": 0}, "ddp_timeout must be >= 1 second"),
    ({"attn_implementation": " "}, "attn_implementation must be a kernel name"),
    ({"fused_lm_head": True, "share_prompt_forward": True}, "fused_lm_head scores whole rows"),
    ({"vllm_enable_sleep_mode": True}, "vllm_enable_sleep_mode puts a colocated engine to sleep"),
    ({"gradient_accumulation_steps": 4, "steps_per_generation": 3},
     "steps_per_generation must divide gradient_accumulation_steps (4), got 3"),
    ({"gradient_accumulation_steps": 4, "steps_per_generation": 0},
     "steps_per_generation must divide gradient_accumulation_steps (4), got 0"),
    ({"gradient_accumulation_steps": 2, "steps_per_generation": 4},
     "steps_per_generation (4) > gradient_accumulation_steps (2) would reuse samples across optimizer steps"),
])
def test_out_of_range_values_are_reported(overrides, message):
    with pytest.raises(ValueError, match="invalid configuration") as info:
        HyPOConfig(**overrides)
    assert message in str(info.value)


def test_max_grad_norm_zero_disables_clipping_and_is_valid():
    assert HyPOConfig(max_grad_norm=0).max_grad_norm == 0.0


@pytest.mark.parametrize(("text", "message"), [
    ("max_steps: 1.5\n", "option 'max_steps': max_steps must be an integer, got 1.5"),
    ("kl_coef: .inf\n", "option 'kl_coef': kl_coef must be a finite number, got inf"),
    ("kl_coef: .nan\n", "option 'kl_coef': kl_coef must be a finite number, got nan"),
    ("beta: '0.1'\n", "option 'beta': beta must be a finite number, got '0.1'"),
    ("use_peft: 1\n", "option 'use_peft': use_peft must be true or false, got 1"),
    ("method: [hypo]\n", "option 'method': method must be one of 'hypo', 'dpo', got ['hypo']"),
    ("dataset: 12\n", "option 'dataset': dataset must be a string or null, got 12"),
    ("num_threads: 2.0\n", "option 'num_threads': num_threads must be an integer or null, got 2.0"),
])
def test_type_errors_in_a_file_name_the_file_and_option(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"run\.yaml: ") as info:
        read_config_file(path)
    assert message in str(info.value)
    with pytest.raises(ValueError, match=r"run\.yaml: "):  # the command line stops the same way
        parse_train_args(["--config", str(path)])


def test_json_non_finite_and_type_errors_name_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"kl_coef": Infinity, "max_steps": "3"}')
    with pytest.raises(ValueError, match=r"run\.json: option 'kl_coef': .*; option 'max_steps': "):
        read_config_file(path)


def test_yaml_exponent_floats_are_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-5\nkl_coef: 5E-2\nbeta: 1.0e-1\n")
    assert read_config_file(path) == {"learning_rate": 1e-5, "kl_coef": 0.05, "beta": 0.1}
    assert parse_train_args(["--config", str(path)]).learning_rate == 1e-5


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.yaml", "beta: 0.1\nmethod: [hypo,\nkl_coef: 0.2\n", r"bad\.yaml: line \d+, column \d+: invalid YAML: .*started on line 2"),
    ("bad.yaml", "beta: 0.1\n  kl_coef: 0.2\n", r"bad\.yaml: line 2, column \d+: invalid YAML"),
    ("bad.yaml", "beta: @oops\n", r"bad\.yaml: line 1, column \d+: invalid YAML"),
    ("bad.json", '{"beta": 0.1,\n "kl_coef": }', r"bad\.json: line 2, column \d+: invalid JSON"),
    ("bad.json", "", r"bad\.json: line 1, column 1: invalid JSON"),
    ("list.yaml", "- beta\n- 0.1\n", r"list\.yaml: expected a mapping of option: value, got list"),
    ("keys.yaml", "1: 2\nbeta: 0.1\n", r"keys\.yaml: unknown option\(s\): 1"),
])
def test_broken_files_are_value_errors_naming_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_config_file(path)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"beta: 0.1\nreport_to: caf\xe9\n")
    with pytest.raises(ValueError, match=r"run\.yaml: not UTF-8 text"):
        read_config_file(path)


def test_a_bfloat16_lora_base_does_not_warn_but_bfloat16_full_weights_do(recwarn):
    """With LoRA, dtype is the frozen base's: bf16 loses no update (the adapters stay float32)."""
    HyPOConfig(use_peft=True, dtype="bfloat16")
    assert not [w for w in recwarn if "bfloat16" in str(w.message)]
    with pytest.warns(UserWarning, match="rounded away"):
        HyPOConfig(dtype="bfloat16")
