"""The `hypo` command: every command of `USAGE`, dispatched from `main`.

`hypo train` with no arguments fine-tunes the embedded SmolLM2-135M-Instruct with HyPO on the bundled
task. Bad input ends a command with a one-line error and exit status 2, never a traceback (HYPO_DEBUG=1
shows it).
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = """hypo: Hybrid Preference Optimization (arXiv 2406.01462) for Hugging Face causal LMs

commands:
  hypo train [--config FILE] [--option value ...]   fine-tune with HyPO (default) or DPO
  hypo eval --model DIR [--reference DIR] [...]     reverse KL and judged win rate on held-out prompts
  hypo sft [--config FILE] [--option value ...]     supervised fine-tuning (TRL's SFTTrainer), for recipes
  hypo plan [--config FILE] [--accelerate_config F]  peak GPU memory of a train run by part, before launch
  hypo export --model DIR --format F --questions Q  answers for AlpacaEval 2 (alpaca_eval) or MT-Bench (mt_bench)
  hypo report RUN_DIR [RUN_DIR ...] [--output_dir D] compare runs: a markdown table and plots
  hypo lab bandit [--quick] [--seed N] [...]         coverage lab: exact bandit DPO / HyPO / RLHF study
  hypo lab lm [--seeds 42,43,44] [...]               coverage lab: DPO / HyPO / RLHF on the language model
  hypo lab rlhf --output_dir D [...]                 coverage lab: one reward-model + RLOO baseline run
  hypo lab partial-coverage [--seeds 1,...] [...]    coverage lab: DPO / HyPO where the data cover part of the space
  hypo bench [--no_trl] [--output FILE]              seconds per step and peak memory, ours vs TRL

`hypo <command> --help` lists every option. Options are spelled with underscores (--max_steps), as in
TRL and transformers; the hyphenated spelling (--max-steps) is accepted too.
"""


def normalize_flags(argv: list[str]) -> list[str]:
    """`--some-option[=v]` -> `--some_option[=v]`: every command takes both spellings and documents one."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--"):
            name, sep, value = arg.partition("=")
            arg = "--" + name[2:].replace("-", "_") + sep + value
        out.append(arg)
    return out


MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
"""glibc malloc settings that keep large tensor buffers in the heap instead of mapping and faulting them
in anew on every allocation: CPU training and generation ran several times faster with them."""


def run_bench(argv: list[str]) -> int:
    from hypo.bench.runner import run_bench as _run_bench

    return _run_bench(argv)


def run_lab(argv: list[str]) -> int:
    from hypo.lab.cli import run_lab as _run_lab

    return _run_lab(argv)


def _command(module: str, name: str):
    """A command's function, imported when it runs (`hypo --help` loads no torch)."""

    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(argv)

    return run


def reexec_with_tuned_malloc() -> None:
    """glibc reads its malloc settings only at process start, so the command line re-executes itself once
    with them (Linux/glibc; skipped when the user set any MALLOC_* variable or HYPO_NO_MALLOC_TUNING=1)."""
    import platform

    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or os.environ.get("HYPO_NO_MALLOC_TUNING")
            or any(key in os.environ for key in MALLOC_SETTINGS)):
        return
    env = {**os.environ, **MALLOC_SETTINGS}
    os.execve(sys.executable, [sys.executable, "-m", "hypo.cli", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the real command line, not a call from Python
        reexec_with_tuned_malloc()
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], normalize_flags(argv[1:])
    commands = {"train": _command("hypo.cli.train", "run_train"), "sft": _command("hypo.cli.train", "run_sft"),
                "plan": _command("hypo.cli.plan", "run_plan"),
                "eval": _command("hypo.cli.evaluate", "run_eval"), "report": _command("hypo.cli.evaluate", "run_report"),
                "export": _command("hypo.cli.evaluate", "run_export"), "lab": run_lab, "bench": run_bench}
    if command not in commands:
        print(f"hypo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[command](rest)
    except (ValueError, FileNotFoundError) as error:  # bad input: a clear message, no traceback
        if os.environ.get("HYPO_DEBUG"):
            raise
        print(f"hypo {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
