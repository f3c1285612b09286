"""TRL's script options in `hypo train` and `hypo sft`: the flags (and `--config` keys) of `trl dpo` / `trl sft`
(`ScriptArguments`, `ModelConfig`, `DPOConfig` / `SFTConfig` and transformers' `TrainingArguments`) that hypo spells
otherwise, translated to hypo's options; those that have no meaning here are refused with the reason, or accepted
only at the value that describes what hypo does anyway. Options whose name is already hypo's (`--beta`,
`--learning_rate`, `--per_device_train_batch_size`, `--max_length`, `--use_peft`, `--lora_r`, ...) need nothing.

`TRL_OPTIONS` is the one table: the parsing (`hypo.cli.train`), `--help` and the README's list come from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def as_bool(value: Any, flag: str) -> bool:
    """A bool option's value from a file (a bool) or a flag (`true` / `False` / `1` / ..., or none: True)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return True
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"--{flag}: expected true or false, got {value!r}")


def _number(value: Any, flag: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{flag}: expected a number, got {value!r}") from None


@dataclass(frozen=True)
class TRLOption:
    """One TRL option: what it means in hypo (`doc`), and how its value becomes hypo options (`translate`: value
    -> {hypo option: value}; deferred options are resolved by `resolve_deferred` once every value is known)."""

    name: str
    doc: str
    translate: Callable[[Any], dict[str, Any]]
    arity: str = "one"  # one value; "bool": an optional true/false; "list": every value up to the next flag


def _rename(target: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {target: value}


def _fixed(name: str, accepted: tuple, reason: str, parse=str) -> Callable[[Any], dict[str, Any]]:
    """Accepted only at a value that describes what hypo does (then nothing changes)."""
    def translate(value):
        if parse(value) not in accepted:
            raise ValueError(f"--{name} {value}: {reason}")
        return {}
    return translate


def _refused(name: str, reason: str) -> Callable[[Any], dict[str, Any]]:
    def translate(value):
        raise ValueError(f"--{name}: {reason}")
    return translate


def _no_effect(name: str) -> Callable[[Any], dict[str, Any]]:
    def translate(value):
        as_bool(value, name)  # a valid value, which changes nothing
        return {}
    return translate


def _precision(name: str, precision: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {"mixed_precision": precision if as_bool(value, name) else "no"}


def _eval_strategy(value: Any) -> dict[str, Any]:
    strategy = str(value).lower()
    if strategy == "no":
        return {"eval_steps": 0, "eval_at_end": False}
    if strategy == "steps":
        return {"trl:eval_strategy_steps": True}
    raise ValueError(f"--eval_strategy {value}: hypo evaluates every eval_steps optimizer steps (--eval_strategy steps "
                     "--eval_steps N) and at the end (eval_at_end); it has no epoch-based evaluation")


def _save_strategy(value: Any) -> dict[str, Any]:
    strategy = str(value).lower()
    if strategy == "no":
        return {"save_steps": 0}
    if strategy == "steps":
        return {"trl:save_strategy_steps": True}
    raise ValueError(f"--save_strategy {value}: hypo saves a checkpoint every save_steps optimizer steps "
                     "(--save_strategy steps --save_steps N) and the final model at the end; no epoch or best saves")


def _warmup_steps(value: Any) -> dict[str, Any]:
    steps = _number(value, "warmup_steps")
    if 0 <= steps < 1:
        return {"warmup_ratio": steps}  # transformers: a float in [0, 1) is a ratio of the total steps
    return {"trl:warmup_steps": steps}


_NO_MEANING = "no meaning in hypo"
TRL_OPTIONS: dict[str, TRLOption] = {o.name: o for o in [
    # ScriptArguments (trl/scripts/utils.py)
    TRLOption("dataset_name", "= --dataset", _rename("dataset")),
    TRLOption("dataset_train_split", "= --dataset_split", _rename("dataset_split")),
    TRLOption("dataset_test_split", "held-out pairs from the same dataset: --eval_dataset <dataset> "
              "--eval_dataset_split <split> (with its --dataset_config); evaluated at the end and every eval_steps",
              lambda value: {"trl:dataset_test_split": str(value)}),
    TRLOption("dataset_streaming", "accepted as false (hypo reads and checks every row before training)",
              _fixed("dataset_streaming", (False,), "hypo reads and checks every row before training; streaming is "
                     "not supported", parse=lambda v: as_bool(v, "dataset_streaming")), arity="bool"),
    # ModelConfig (trl/trainer/model_config.py)
    TRLOption("torch_dtype", "= --dtype", _rename("dtype")),
    TRLOption("model_revision", "accepted as main (hypo loads the default revision)",
              _fixed("model_revision", ("main",), "hypo loads a model's default revision; download the revision "
                     "and pass its folder as --model_name_or_path")),
    TRLOption("lora_target_modules", "several names (TRL) or one comma-separated list (hypo)",
              lambda value: {"lora_target_modules": ",".join(value) if isinstance(value, list) else value},
              arity="list"),
    TRLOption("lora_task_type", "accepted as CAUSAL_LM",
              _fixed("lora_task_type", ("CAUSAL_LM",), "hypo trains causal LMs")),
    *[TRLOption(name, f"refused ({why})", _refused(name, f"{_NO_MEANING} yet ({why})"), arity=arity)
      for name, why, arity in [
          ("use_dora", "LoRA adapters only; pass a peft config to HyPOTrainer for other kinds", "bool"),
          ("use_rslora", "plain LoRA scaling; pass a peft LoraConfig to HyPOTrainer for rsLoRA", "bool"),
          ("lora_modules_to_save", "pass a peft LoraConfig to HyPOTrainer", "list"),
          ("lora_target_parameters", "pass a peft LoraConfig to HyPOTrainer", "list"),
          ("load_in_4bit", "quantized training is not supported; train LoRA on a float32 or bf16 base", "bool"),
          ("load_in_8bit", "quantized training is not supported; train LoRA on a float32 or bf16 base", "bool"),
      ]],
    # TrainingArguments / DPOConfig / SFTConfig
    TRLOption("bf16", "= --mixed_precision bf16 (false: no)", _precision("bf16", "bf16"), arity="bool"),
    TRLOption("fp16", "= --mixed_precision fp16 (false: no)", _precision("fp16", "fp16"), arity="bool"),
    TRLOption("eval_strategy", "no: --eval_steps 0 --eval_at_end false; steps: evaluate every --eval_steps (default "
              "logging_steps, as transformers); epoch: refused", _eval_strategy),
    TRLOption("save_strategy", "no: --save_steps 0; steps: a checkpoint every --save_steps (default 500, as "
              "transformers); epoch, best: refused", _save_strategy),
    TRLOption("warmup_steps", "a float in [0, 1): = --warmup_ratio; N >= 1 steps: --warmup_ratio N / max_steps "
              "(needs max_steps)", _warmup_steps),
    TRLOption("report_to", "several trackers (TRL) or one comma-separated list (hypo)",
              lambda value: {"report_to": ",".join(value) if isinstance(value, list) else value}, arity="list"),
    TRLOption("no_gradient_checkpointing", "= --gradient_checkpointing false (hypo's default)",
              lambda value: {"gradient_checkpointing": not as_bool(value, "no_gradient_checkpointing")},
              arity="bool"),
    TRLOption("disable_dropout", "accepted as true (hypo always disables dropout)",
              _fixed("disable_dropout", (True,), "hypo always disables dropout in policy and reference",
                     parse=lambda v: as_bool(v, "disable_dropout")), arity="bool"),
    TRLOption("remove_unused_columns", "accepted, no effect (hypo reads only the columns it uses)",
              _no_effect("remove_unused_columns"), arity="bool"),
    TRLOption("no_remove_unused_columns", "accepted, no effect (hypo reads only the columns it uses)",
              _no_effect("no_remove_unused_columns"), arity="bool"),
    TRLOption("optim", "accepted as adamw_torch or adamw_torch_fused (hypo's optimizer: AdamW, fused on CPU and "
              "CUDA)", _fixed("optim", ("adamw_torch", "adamw_torch_fused"), "hypo's optimizer is torch's AdamW")),
    *[TRLOption(name, f"accepted as {default:g} (AdamW's default, which hypo uses)",
                _fixed(name, (default,), f"hypo's AdamW uses {default:g}", parse=lambda v, n=name: _number(v, n)))
      for name, default in [("adam_beta1", 0.9), ("adam_beta2", 0.999), ("adam_epsilon", 1e-8)]],
    TRLOption("logging_strategy", "accepted as steps (every --logging_steps)",
              _fixed("logging_strategy", ("steps",), "hypo logs every logging_steps optimizer steps")),
    *[TRLOption(name, f"refused ({why})", _refused(name, f"{_NO_MEANING}: {why}"), arity=arity)
      for name, why, arity in [
        ("load_best_model_at_end", "hypo has no single best metric; --target_kl keeps the last evaluated state "
         "within a reverse-KL budget", "bool"),
        ("metric_for_best_model", "see --target_kl for a KL budget", "one"),
        ("eval_on_start", "evaluate the initial model with `hypo eval --model <model>`", "bool"),
        ("sync_ref_model", "the reference stays the initial model: the KL term is to it", "bool"),
        ("use_liger_kernel", "hypo computes log-probs with its own float32 log-softmax", "bool"),
        ("padding_free", "hypo pads batches", "bool"),
        ("deepspeed", "launch with accelerate launch --use_deepspeed, see the README", "one"),
        ("fsdp", "launch with accelerate launch --use_fsdp --fsdp_version 2, see the README", "one"),
        ("hub_token", "log in with `hf auth login` or set HF_TOKEN", "one"),
    ]],
]}


def _flag_value(argv: list[str], i: int, option: TRLOption) -> tuple[Any, int]:
    """The value of the flag at argv[i] and the index after it."""
    name, has_value, value = argv[i][2:].partition("=")
    if has_value:
        return (value.split(",") if option.arity == "list" and "," in value else value), i + 1
    following = []
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        following.append(argv[j])
        j += 1
    if option.arity == "list":
        if not following:
            raise ValueError(f"--{name}: expected one or more values")
        return (following if len(following) > 1 else following[0]), j
    if option.arity == "bool":
        if following and following[0].lower() in _TRUE | _FALSE:
            return following[0], i + 2
        return None, i + 1
    if not following:
        raise ValueError(f"--{name}: expected a value")
    return following[0], i + 2


def extract_trl_flags(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split TRL's flags (`TRL_OPTIONS`) off a command line: ({name: raw value}, the other arguments)."""
    found: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if arg == "--":
            rest += argv[i:]
            break
        if name in TRL_OPTIONS:
            if name in found:
                raise ValueError(f"--{name} is given twice")
            found[name], i = _flag_value(argv, i, TRL_OPTIONS[name])
            continue
        rest.append(arg)
        i += 1
    return found, rest


def translate_trl_options(options: dict[str, Any], config_class, given: set[str]) -> tuple[dict, dict]:
    """TRL's options -> (hypo options, deferred ones for `resolve_deferred`). An option `config_class` does not have
    (`hypo sft` evaluates nothing) and a hypo option also given under its own name (`given`) are errors."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    deferred: dict[str, Any] = {}
    for name, raw in options.items():
        translated = TRL_OPTIONS[name].translate(raw)
        if name == "eval_strategy" and "eval_steps" not in fields and translated.get("eval_steps") == 0:
            continue  # no evaluation, in a command that does not evaluate
        for key, value in translated.items():
            if key.startswith("trl:"):  # resolved later; the option it will set must exist here
                deferred[key] = value
                if _DEFERRED_FIELDS[key] not in fields:
                    raise ValueError(f"--{name}: this command has no {_DEFERRED_FIELDS[key]}")
                continue
            if key not in fields:
                raise ValueError(f"--{name}: this command has no {key} (it means --{key} here)")
            if key in given:
                raise ValueError(f"--{name} (TRL's name) sets --{key}, which is given too: give one of them")
            if key in values and values[key] != value:
                raise ValueError(f"--{name} sets {key} to {value!r}, another TRL option to {values[key]!r}")
            values[key] = value
    return values, deferred


_DEFERRED_FIELDS = {"trl:dataset_test_split": "eval_dataset", "trl:eval_strategy_steps": "eval_steps",
                    "trl:save_strategy_steps": "save_steps", "trl:warmup_steps": "warmup_ratio"}
"""The hypo option each deferred TRL option sets (`resolve_deferred`)."""


def resolve_deferred(values: dict[str, Any], deferred: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The hypo options of TRL's options that depend on others, from the final `values` (`explicit`: the options
    the user set, so that a default is not taken for a choice)."""
    out: dict[str, Any] = {}
    if "trl:dataset_test_split" in deferred:
        if not values.get("dataset"):
            raise ValueError("--dataset_test_split is a split of --dataset_name (--dataset), which is not set")
        if values.get("eval_dataset") and values["eval_dataset"] != values["dataset"]:
            raise ValueError("--dataset_test_split takes the held-out pairs from --dataset_name, but --eval_dataset "
                             f"is {values['eval_dataset']!r}: give one")
        out.update(eval_dataset=values["dataset"], eval_dataset_split=deferred["trl:dataset_test_split"],
                   eval_dataset_config=values.get("dataset_config"))
    if deferred.get("trl:eval_strategy_steps") and "eval_steps" not in explicit:
        out["eval_steps"] = values["logging_steps"]  # transformers: eval_steps defaults to logging_steps
    if deferred.get("trl:save_strategy_steps") and "save_steps" not in explicit:
        out["save_steps"] = 500  # transformers' default
    if "trl:warmup_steps" in deferred:
        steps, max_steps = deferred["trl:warmup_steps"], values.get("max_steps", -1)
        if not steps.is_integer() or max_steps <= 0 or steps >= max_steps:
            raise ValueError(f"--warmup_steps {steps:g}: hypo's warm-up is a fraction of max_steps (--warmup_ratio); "
                             f"{steps:g} steps convert only with max_steps > {steps:g} (max_steps is {max_steps})")
        out["warmup_ratio"] = steps / max_steps
    return out


def trl_options_help(config_class) -> str:
    """`--help`'s list of TRL's option names (those this command can take)."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    lines = ["TRL's option names (trl dpo / trl sft) are accepted too:"]
    for option in TRL_OPTIONS.values():
        if option.name == "dataset_test_split" and "eval_dataset" not in fields:
            continue
        lines.append(f"  --{option.name}: {option.doc}")
    return "\n".join(lines)
