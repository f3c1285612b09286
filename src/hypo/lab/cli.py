"""`hypo lab bandit | lm | rlhf | partial-coverage | coverage-controls`: the coverage lab's command line.

- `bandit`: exact contextual-bandit sweeps (`hypo.lab.bandit.experiments`), minutes on a CPU.
- `lm`: DPO, HyPO and RLHF runs on the embedded language model (`hypo.lab.lm.grid`), hours on a CPU, resumable.
- `rlhf`: one RLHF baseline run (`hypo.lab.lm.rlhf`); it takes `hypo train`'s options plus the reward model's.
- `partial-coverage`: DPO and HyPO on a synthetic language with partial coverage by construction, judged in
  three gold worlds (`hypo.lab.partial_coverage.experiment`), under an hour on a CPU, resumable.
- `coverage-controls`: the same language in several worlds, under partial and full coverage, with label-free DPO
  baselines and HyPO in as many settings (`hypo.lab.coverage_controls.experiment`), hours on a CPU, resumable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

USAGE = """hypo lab: the coverage lab (arXiv 2406.01462)

  hypo lab bandit [--quick] [--seed N] [--instances N] [--regimes A,B] [--output_dir D]
  hypo lab lm [--seeds 42,43,44] [--methods dpo,hypo,rlhf] [--runs_dir D] [--output_dir D]
  hypo lab rlhf --output_dir D [hypo train options] [--reward_model_dir D ...]
  hypo lab partial-coverage [--seeds 1,...,8] [--kl_coefs A,B] [--runs_dir D] [--output_dir D] [--collect_only]
  hypo lab coverage-controls [--quick] [--world_seeds A,B] [--seeds A,B] [--runs_dir D] [--output_dir D] [--collect_only]

`hypo lab <experiment> --help` lists every option.
"""


def bandit_parser() -> argparse.ArgumentParser:
    from hypo.lab.bandit.regimes import REGIMES

    p = argparse.ArgumentParser(prog="hypo lab bandit", description="Exact contextual-bandit experiments comparing "
                                "DPO, HyPO and KL-regularized RLHF under global and partial coverage.")
    p.add_argument("--quick", action="store_true", help="Two regimes, few instances and steps (seconds).")
    p.add_argument("--seed", type=int, default=0, help="Seed of instances, data and sampling.")
    p.add_argument("--instances", type=int, default=None, help="Random instances per regime (default 40; quick 4).")
    p.add_argument("--regimes", default=None, help=f"Comma-separated subset of: {', '.join(REGIMES)}.")
    p.add_argument("--optimizer", choices=["adam", "gd"], default="adam", help="Full-batch Adam or gradient descent.")
    p.add_argument("--output_dir", default="lab-results/bandit", help="Folder for the table and plots.")
    p.add_argument("--equal_terms", action="store_true", help="Instead: every method with five settings, picked per "
                   "KL budget without the gold reward (and by it, beside), paired intervals; writes equal_terms.md/csv.")
    return p


def run_bandit(argv: list[str]) -> int:
    import torch

    from hypo.lab.bandit.experiments import LabConfig, run_bandit_lab
    from hypo.lab.bandit.regimes import split_regime
    from hypo.lab.bandit.training import TrainSettings

    args = bandit_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.equal_terms:
        return run_bandit_equal_terms(args)
    config = LabConfig.quick(args.seed) if args.quick else LabConfig(seed=args.seed)
    if args.instances is not None:
        config.instances = args.instances
    if args.regimes:
        config.regimes = tuple(args.regimes.split(","))
        for regime in config.regimes:
            split_regime(regime)
    if args.optimizer == "gd":
        config.train = TrainSettings(steps=config.train.steps, learning_rate=1.0, optimizer="gd",
                                     log_every=config.train.log_every)
    start = time.perf_counter()
    out = Path(args.output_dir)
    run_bandit_lab(config, out)
    print(f"hypo lab bandit: {len(config.regimes)} regimes x {config.instances} instances in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"  table: {out / 'results.csv'}, {out / 'summary.md'}")
    print(f"  plots: {out / 'frontier.png'}, {out / 'curves_kl.png'} (+ off_support, reward, logps)")
    return 0


def run_bandit_equal_terms(args: argparse.Namespace) -> int:
    from hypo.lab.bandit.equal_terms import EqualTermsConfig, run_equal_terms
    from hypo.lab.bandit.regimes import split_regime

    config = EqualTermsConfig.quick(args.seed) if args.quick else EqualTermsConfig(seed=args.seed)
    if args.instances is not None:
        config.instances = args.instances
    if args.regimes:
        config.regimes = tuple(args.regimes.split(","))
        for regime in config.regimes:
            split_regime(regime)
    start = time.perf_counter()
    out = Path(args.output_dir)
    run_equal_terms(config, out)
    print(f"hypo lab bandit --equal_terms: {len(config.regimes)} regimes x {config.instances} instances in "
          f"{time.perf_counter() - start:.1f} s; tables: {out / 'equal_terms.md'}, {out / 'equal_terms.csv'}")
    return 0


def lm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypo lab lm", description="DPO, HyPO and RLHF runs on the embedded language "
                                "model with the bundled task's gold judge (hours on a CPU; resumable).")
    p.add_argument("--runs_dir", default="runs/lab-lm", help="Folder of the run folders (models deleted after "
                   "evaluation unless --keep_models); finished runs are skipped, so a stopped grid resumes.")
    p.add_argument("--output_dir", default="lab-results/lm", help="Folder for the table and plots.")
    p.add_argument("--methods", default="dpo,hypo,rlhf", help="Comma-separated subset of dpo, hypo, rlhf.")
    p.add_argument("--seeds", default="42,43,44", help="Seeds of each method's default setting; the sweep points "
                   "use the first.")
    p.add_argument("--collect_only", action="store_true", help="Only rebuild the table and plots.")
    p.add_argument("--keep_models", action="store_true", help="Keep each run's trained model.")
    p.add_argument("--quick", action="store_true", help="Two steps per run on the model and data given by "
                   "--model_name_or_path, --dataset, --prompts and --eval_prompts (seconds; for tests).")
    for name in ("model_name_or_path", "dataset", "prompts", "eval_prompts"):
        p.add_argument(f"--{name}", default=None, help="--quick: the tiny model / data file to use.")
    return p


def run_lm(argv: list[str]) -> int:
    from hypo.lab.lm.grid import METHODS, LMLabConfig, run_lm_lab

    args = lm_parser().parse_args(argv)
    if args.quick:
        names = ("model_name_or_path", "dataset", "prompts", "eval_prompts")
        missing = [f"--{name}" for name in names if getattr(args, name) is None]
        if missing:
            raise ValueError(f"hypo lab lm --quick needs {', '.join(missing)}")
        config = LMLabConfig.quick(*(getattr(args, name) for name in names))
    else:
        config = LMLabConfig(seeds=tuple(int(s) for s in args.seeds.split(",")))
    config.methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    config.keep_models = args.keep_models
    start = time.perf_counter()
    out = Path(args.output_dir)
    try:
        rows = run_lm_lab(config, Path(args.runs_dir), out, collect_only=args.collect_only)
    except RuntimeError as error:
        print(f"hypo lab lm: {error}", file=sys.stderr)
        return 1
    print(f"hypo lab lm: {len(rows)} settings collected in {time.perf_counter() - start:.1f} s")
    print(f"  table: {out / 'summary.md'}; plots: {out / 'frontier.png'}, {out / 'kl_over_training.png'}")
    return 0


def run_rlhf(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from hypo.config import HyPOConfig
    from hypo.lab.lm.rlhf import RewardModelConfig, run_rlhf

    parser = HfArgumentParser((HyPOConfig, RewardModelConfig), prog="hypo lab rlhf",
                              description="Online-RLHF baseline: a reward model fitted on the pairs, then RLOO "
                                          "with kl_coef as its KL penalty, under hypo train's settings.")
    config, reward = parser.parse_args_into_dataclasses(argv)
    if not config.output_dir:
        raise ValueError("hypo lab rlhf needs --output_dir")
    metrics = run_rlhf(config, reward)["metrics"]
    print(f"rlhf kl_coef={config.kl_coef} seed={config.seed}: reverse KL {metrics['objective/kl']:.3f}, "
          f"win rate {metrics['win_rate']:.3f}")
    return 0


def partial_coverage_parser() -> argparse.ArgumentParser:
    from hypo.lab.partial_coverage.experiment import PartialCoverageConfig

    d = PartialCoverageConfig()
    p = argparse.ArgumentParser(prog="hypo lab partial-coverage", description="DPO and HyPO on a synthetic language "
                                "whose offline pairs never vary the response length outside [8, 12], judged in three "
                                "gold worlds that agree on every pair (docs/coverage-lab-partial.md). Resumable.")
    p.add_argument("--runs_dir", default="runs/lab-partial-coverage", help="World model, logs and (temporary) run "
                   "folders.")
    p.add_argument("--output_dir", default="docs/lab-results/partial-coverage", help="Per-run JSON results, "
                   "reference.json, gate.json, summary.md/json; a run whose JSON exists is skipped.")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="Training seeds (DPO and each HyPO "
                   "kl_coef per seed).")
    p.add_argument("--kl_coefs", default=",".join(f"{k:g}" for k in d.kl_coefs), help="HyPO's kl_coef values.")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--no_gate", action="store_true", help="Run the whole grid even if the first DPO run does not "
                   "move off the data's range (the preregistered gate is on by default).")
    p.add_argument("--collect_only", action="store_true", help="Only rebuild summary.md/json from the JSON files.")
    return p


def run_partial_coverage(argv: list[str]) -> int:
    from hypo.lab.partial_coverage.experiment import PartialCoverageConfig, run_partial_coverage_lab

    args = partial_coverage_parser().parse_args(argv)
    config = PartialCoverageConfig(seeds=tuple(int(s) for s in args.seeds.split(",") if s),
                         kl_coefs=tuple(float(k) for k in args.kl_coefs.split(",") if k),
                         learning_rate=args.learning_rate, epochs=args.epochs, gate=not args.no_gate)
    start = time.perf_counter()
    out = Path(args.output_dir)
    try:
        run_partial_coverage_lab(config, Path(args.runs_dir), out, collect_only=args.collect_only,
                                 log=lambda s: print(s, flush=True))
    except RuntimeError as error:
        print(f"hypo lab partial-coverage: {error}", file=sys.stderr)
        return 1
    print(f"hypo lab partial-coverage: done in {time.perf_counter() - start:.1f} s; tables: {out / 'summary.md'}")
    return 0


def coverage_controls_parser() -> argparse.ArgumentParser:
    from hypo.lab.coverage_controls.experiment import CoverageControlsConfig

    d = CoverageControlsConfig()
    p = argparse.ArgumentParser(prog="hypo lab coverage-controls", description="DPO and HyPO, each in four settings "
                                "read by label-free rules, on the partial-coverage language in several worlds under "
                                "partial and full coverage (docs/coverage-lab-controls.md). Resumable.")
    p.add_argument("--quick", action="store_true", help="Two tiny worlds, one seed, two settings, 2 steps per run "
                   "(about a minute; for the tests).")
    p.add_argument("--runs_dir", default="runs/lab-coverage-controls", help="Worlds, logs and (temporary) run folders.")
    p.add_argument("--output_dir", default="docs/lab-results/coverage-controls", help="Per-run JSON results, "
                   "references, summary.md/json, curves.png; a run whose JSON exists is skipped.")
    p.add_argument("--world_seeds", default=None, help=f"World seeds (default {','.join(map(str, d.world_seeds))}).")
    p.add_argument("--seeds", default=None, help=f"Training seeds (default {','.join(map(str, d.seeds))}).")
    p.add_argument("--coverages", default=None, help="partial,full (default both).")
    p.add_argument("--collect_only", action="store_true", help="Only rebuild the tables from the JSON files.")
    return p


def run_coverage_controls(argv: list[str]) -> int:
    from hypo.lab.coverage_controls.experiment import CoverageControlsConfig
    from hypo.lab.coverage_controls.experiment import run_coverage_controls as run

    args = coverage_controls_parser().parse_args(argv)
    config = CoverageControlsConfig.quick() if args.quick else CoverageControlsConfig()
    for name in ("world_seeds", "seeds"):
        if getattr(args, name):
            setattr(config, name, tuple(int(s) for s in getattr(args, name).split(",") if s))
    if args.coverages:
        config.coverages = tuple(c for c in args.coverages.split(",") if c)
    start = time.perf_counter()
    out = Path(args.output_dir)
    try:
        run(config, Path(args.runs_dir), out, collect_only=args.collect_only, log=lambda s: print(s, flush=True))
    except RuntimeError as error:
        print(f"hypo lab coverage-controls: {error}", file=sys.stderr)
        return 1
    print(f"hypo lab coverage-controls: done in {time.perf_counter() - start:.1f} s; tables: {out / 'summary.md'}")
    return 0


def run_lab(argv: list[str]) -> int:
    """Entry point of `hypo lab ...`."""
    experiments = {"bandit": run_bandit, "lm": run_lm, "rlhf": run_rlhf, "partial-coverage": run_partial_coverage,
                   "coverage-controls": run_coverage_controls}
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in experiments:
        raise ValueError(f"unknown lab experiment {argv[0]!r}; choose from {', '.join(experiments)}")
    return experiments[argv[0]](argv[1:])
