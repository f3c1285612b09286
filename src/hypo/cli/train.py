"""`hypo train` and `hypo sft`: a typed config from a YAML/JSON file (`--config`) and flags on top.

`hypo train --config run.yaml --beta 0.2` reads the file, then applies the flags; resuming
(`--resume_from_checkpoint`) starts from the options of the run being resumed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hypo.config import HyPOConfig, read_config_file


def config_parser(config_class, prog: str, description: str):
    """The flags of a typed config dataclass, plus `--config` (a YAML or JSON file of the same options)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_class, prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (the same names as the flags).")
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
    """`config_class` from, in order of precedence: the flags, `--config`, then `base_files`; unknown
    options are an error."""
    config_file = _pre_parse(argv, "--config").config
    for path in (*base_files, *([config_file] if config_file else [])):
        parser.set_defaults(**read_config_file(path, config_class))
    return config_class(**{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "config"})


def parse_train_args(argv: list[str]) -> HyPOConfig:
    """Options of the run being resumed (its config.json) first, then `--config`, then the flags."""
    pre = _pre_parse(argv, "--resume_from_checkpoint", "--output_dir")
    base: tuple[Path, ...] = ()
    if pre.resume_from_checkpoint:
        run_dir = Path(pre.output_dir) if pre.output_dir else Path(pre.resume_from_checkpoint).parent
        base = (run_dir / "config.json",) if (run_dir / "config.json").is_file() else ()
    return parse_config_args(train_parser(), HyPOConfig, argv, base)


def run_train(argv: list[str]) -> int:
    from hypo.evaluation.held_out import format_summary
    from hypo.training.stopping import NonFiniteError, TrainingInterrupted
    from hypo.training.trainer import train

    config = parse_train_args(argv)
    try:
        result = train(config)
    except TrainingInterrupted as stop:
        print(f"\nhypo train: {stop}\n  resume with: hypo train --resume_from_checkpoint {stop.checkpoint}",
              file=sys.stderr)
        return stop.exit_code
    except NonFiniteError as error:
        print(f"hypo train: error: {error}", file=sys.stderr)
        return 1
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


