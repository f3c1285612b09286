"""`hypo train` and `hypo sft`: a typed config from a YAML/JSON file (`--config`) and flags on top.

`hypo train --config run.yaml --beta 0.2` reads the file, then applies the flags; resuming
(`--resume_from_checkpoint`) starts from the options of the run being resumed. TRL's option names
(`--dataset_name`, `--dataset_train_split`, `--bf16`, ...) are accepted in flags and files
(`hypo.cli.trl_options`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hypo.cli.trl_options import (
    TRL_OPTIONS,
    extract_trl_flags,
    resolve_deferred,
    translate_trl_options,
    trl_options_help,
)
from hypo.config import HyPOConfig, read_config_file


def config_parser(config_class, prog: str, description: str):
    """The flags of a typed config dataclass, plus `--config` (a YAML or JSON file of the same options); `--help`
    ends with TRL's option names this command accepts."""
    from transformers import HfArgumentParser

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Defaults shown (HfArgumentParser's choice), the epilog's lines kept."""

    parser = HfArgumentParser(config_class, prog=prog, description=description, epilog=trl_options_help(config_class),
                              formatter_class=Formatter)
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (the same names as the flags, "
                        "or TRL's).")
    return parser


def train_parser():
    return config_parser(HyPOConfig, "hypo train", "Fine-tune a causal LM with HyPO or DPO. Options may also come "
                         "from --config (YAML or JSON); flags given here override the file.")


def _pre_parse(argv: list[str], *names: str) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    for name in names:
        pre.add_argument(name)
    return pre.parse_known_args(argv)[0]


def parse_config_args(parser, config_class, argv: list[str], base_files: tuple[Path, ...] = ()):
    """`config_class` from, in order of precedence: the flags, `--config`, then `base_files`; TRL's option names
    are translated (`hypo.cli.trl_options`); unknown options are an error."""
    trl_flags, argv = extract_trl_flags(argv)
    config_file = _pre_parse(argv, "--config").config
    explicit, deferred = set(), {}
    for path in (*base_files, *([config_file] if config_file else [])):
        options, file_deferred = read_options_file(path, config_class)
        parser.set_defaults(**options)
        explicit |= set(options)
        deferred.update(file_deferred)
    given = {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
    translated, flag_deferred = translate_trl_options(trl_flags, config_class, given)
    values = {k: v for k, v in vars(parse_known_options(parser, argv)).items() if k != "config"}
    values.update(translated)
    deferred.update(flag_deferred)
    values.update(resolve_deferred(values, deferred, explicit | given | set(translated)))
    return config_class(**values)


def read_options_file(path, config_class) -> tuple[dict, dict]:
    """A `--config` file's options, TRL's names translated: (hypo options, deferred TRL options)."""
    translated: dict = {}

    def translate(data: dict) -> dict:
        trl = {key: data[key] for key in data if key in TRL_OPTIONS}
        rest = {key: value for key, value in data.items() if key not in TRL_OPTIONS}
        values, deferred = translate_trl_options(trl, config_class, set(rest))
        translated["deferred"] = deferred
        return {**rest, **values}

    options = read_config_file(path, config_class, translate=translate)
    return options, translated.get("deferred", {})


def parse_known_options(parser, argv: list[str]) -> argparse.Namespace:
    """The parsed flags; an unknown one is a ValueError that says, when TRL is installed, whether it is a TRL or
    transformers option (which hypo does not take) or a typo."""
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [arg for arg in unknown if arg.startswith("-")]
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}" + _unknown_flags_hint(flags))
    return namespace


def _unknown_flags_hint(flags: list[str]) -> str:
    try:
        import dataclasses

        from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig
    except ImportError:
        return ""
    trl_fields = {f.name for cls in (DPOConfig, SFTConfig, ModelConfig, ScriptArguments) for f in dataclasses.fields(cls)}
    named = [flag for flag in flags if flag.lstrip("-").partition("=")[0] in trl_fields]
    if not named:
        return ""
    return (f" ({', '.join(named)}: TRL / transformers option(s) that hypo does not take; `--help` lists hypo's "
            "options and the TRL names it accepts)")


def parse_train_args(argv: list[str]) -> HyPOConfig:
    """Options of the run being resumed (its config.json) first, then `--config`, then the flags."""
    pre = _pre_parse(argv, "--resume_from_checkpoint", "--output_dir")
    base: tuple[Path, ...] = ()
    if pre.resume_from_checkpoint:
        run_dir = Path(pre.output_dir) if pre.output_dir else Path(pre.resume_from_checkpoint).parent
        base = (run_dir / "config.json",) if (run_dir / "config.json").is_file() else ()
    return parse_config_args(train_parser(), HyPOConfig, argv, base)


def run_train(argv: list[str]) -> int:
    from hypo.runtime.accelerator import close_process_groups
    from hypo.training.stopping import NonFiniteError, TrainingInterrupted
    from hypo.training.trainer import train

    config = parse_train_args(argv)
    agreed = False  # ended as every process did: finished, stopped by a signal, or a non-finite step
    try:
        result = train(config)
        agreed = True
    except TrainingInterrupted as stop:
        agreed = True
        print(f"\nhypo train: {stop}\n  resume with: hypo train --resume_from_checkpoint {stop.checkpoint}",
              file=sys.stderr)
        return stop.exit_code
    except NonFiniteError as error:
        agreed = True
        print(f"hypo train: error: {error}", file=sys.stderr)
        return 1
    finally:  # the command exits next: close the process groups while the interpreter is fully alive
        close_process_groups(after_error=not agreed)
    return summarize(config, result)


def summarize(config: HyPOConfig, result) -> int:
    """Print where a finished run's model, metrics and results are (main process only)."""
    from hypo.evaluation.held_out import format_summary

    if not result.is_main_process:
        return 0
    m, settings = result.final_metrics, (result.eval or {}).get("settings")
    print(f"\nhypo train (method {config.method}): {result.steps} steps in {result.seconds / 60:.1f} min "
          f"({result.seconds / result.steps:.2f} s/step)")
    if result.stopped_early:
        print(f"  stopped early: {result.stopped_early}")
    print(f"  model:    {result.model_dir}")
    print(f"  metrics:  {result.output_dir / 'metrics.jsonl'}")
    if m:
        print(f"  last step: loss {m['loss']:.4f}, reward margin {m['rewards/margins']:.3f}, "
              f"accuracy {m['rewards/accuracies']:.2f}"
              + (f", objective/kl {m['objective/kl']:.3f}" if "objective/kl" in m else ""))
    if result.hub_url:
        print(f"  hub:      {result.hub_url}")
    if result.eval:
        print(f"  results:  {result.output_dir / 'eval_results.json'}")
        for line in format_summary(result.eval["metrics"], settings):
            print("  " + line)
    return 0


def sft_parser():
    from hypo.training.sft import SFTRunConfig

    return config_parser(SFTRunConfig, "hypo sft", "Supervised fine-tuning with TRL's SFTTrainer (the SFT step of "
                         "the recipes). Options may also come from --config (YAML or JSON).")


def run_sft(argv: list[str]) -> int:
    from hypo.training.sft import SFTRunConfig, sft

    config = parse_config_args(sft_parser(), SFTRunConfig, argv)
    result = sft(config)
    loss = f", train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
    print(f"\nhypo sft: {result.steps} steps in {result.seconds / 60:.1f} min{loss}\n  model: {result.model_dir}")
    return 0


