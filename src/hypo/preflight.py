"""Checks of a run's inputs before any model loads or anything is written: every row of every data
source, the judge's name, and the model paths. A newcomer's bad row 7 costs them no model load."""

from __future__ import annotations

import re
from pathlib import Path

from hypo.config import HyPOConfig

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def check_run_inputs(config: HyPOConfig) -> None:
    """Raise a ValueError / FileNotFoundError naming the file, row and field (data), the judge, or the
    model path that is wrong."""
    check_model_path(config.model_name_or_path, "model_name_or_path", config.gguf_file)
    if config.ref_model_name_or_path:
        check_model_path(config.ref_model_name_or_path, "ref_model_name_or_path")
    warn_if_checkpoint_starts_a_new_run(config)
    check_data(config)
    judge = config.judge if config.judge or config.dataset else _task(config).judge
    if judge:
        check_judge(judge)


def check_model_path(name_or_path: str, option: str, gguf_file: str | None = None) -> None:
    """A local path must exist; a name shaped like a hub id (`name` or `org/name`) is left to the hub."""
    from hypo.models import DEFAULT_MODEL, embedded_gguf_path

    if name_or_path in ("", DEFAULT_MODEL):
        embedded_gguf_path()  # the embedded model's package is installed
        return
    path = Path(name_or_path).expanduser()
    if gguf_file:
        path = path / gguf_file
    if path.exists():
        return
    if gguf_file or name_or_path.endswith(".gguf") or not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(f"{option}: {path} does not exist")


def check_data(config: HyPOConfig) -> None:
    """Every row of the pairs, the unlabeled prompts (HyPO), the held-out prompts and the held-out pairs."""
    from hypo.data import check_preference_source, check_prompt_source

    pairs, prompts, eval_prompts = config.dataset, config.prompts, config.eval_prompts
    if pairs is None:
        task = _task(config)
        pairs, prompts, eval_prompts = str(task.pairs), prompts or str(task.prompts), eval_prompts or str(task.eval_prompts)
    skip = config.skip_bad_rows
    check_preference_source(pairs, split=config.dataset_split, config_name=config.dataset_config, skip_bad_rows=skip)
    if config.method == "hypo" and prompts:
        check_prompt_source(prompts, split=config.prompts_split, config_name=config.prompts_config, skip_bad_rows=skip)
    evaluates = config.eval_at_end or config.eval_steps
    if eval_prompts and evaluates:
        check_prompt_source(eval_prompts, split=config.eval_prompts_split, config_name=config.eval_prompts_config,
                            skip_bad_rows=skip)
    if config.eval_dataset and evaluates:
        check_preference_source(config.eval_dataset, split=config.eval_dataset_split,
                                config_name=config.eval_dataset_config, skip_bad_rows=skip)


def check_judge(name: str) -> None:
    """A registered name, or `rm:<path>` whose local path exists (a hub id is left to the hub)."""
    from hypo.judges import available_judges

    if name.startswith("rm:"):
        check_model_path(name[3:], f"judge {name}")
        return
    if name not in available_judges():
        raise ValueError(f"unknown judge {name!r}; known judges: {', '.join(available_judges())}, "
                         "or rm:<reward model path>")


def _task(config: HyPOConfig):
    from hypo.tasks import get_task

    return get_task(config.task)


def warn_if_checkpoint_starts_a_new_run(config: HyPOConfig) -> None:
    """A hypo checkpoint given as the model of a new run also becomes its reference (not the initial model
    of the run that made it): say so, and how to continue that run or keep its reference."""
    import json
    import logging

    path = Path(config.model_name_or_path)
    if config.ref_model_name_or_path or config.use_peft or not (path / "training_state").is_dir():
        return
    run_config = path.parent / "config.json"
    initial = json.loads(run_config.read_text()).get("model_name_or_path") if run_config.is_file() else None
    logging.getLogger(__name__).warning(
        "%s is a checkpoint of a hypo run: a new run starting from it also takes it as the reference. To continue "
        "that run use --resume_from_checkpoint %s; to keep its reference pass --ref_model_name_or_path %s",
        path, path, initial or "<the run's initial model>")
