"""Checks of a run's inputs before any model loads or anything is written: every row of every data
source, the judge's name, and the model paths. A newcomer's bad row 7 costs them no model load."""

from __future__ import annotations

from pathlib import Path

from hypo.config import DEFAULT_MODEL, HUB_REPO_ID, HyPOConfig
from hypo.data.sources import InMemoryRows, check_run_sources, run_sources


def check_run_inputs(config: HyPOConfig, given: InMemoryRows | None = None, *, model_given: bool = False,
                     ref_model_given: bool = False) -> None:
    """Raise a ValueError / FileNotFoundError naming the file (or in-memory dataset), row and field (data), the
    judge, or the model path that is wrong. The data and the judge are those the run will load (`run_sources`);
    models handed over loaded (`model_given`, `ref_model_given`) have no path to check."""
    if not model_given:
        check_model_path(config.model_name_or_path, "model_name_or_path", config.gguf_file)
        warn_if_checkpoint_starts_a_new_run(config)
    if config.ref_model_name_or_path and not ref_model_given:
        check_model_path(config.ref_model_name_or_path, "ref_model_name_or_path")
    sources = run_sources(config, given)
    if config.target_kl is not None and sources.eval_prompts is None:
        raise ValueError("target_kl is measured on held-out prompts: give eval_prompts (a path, or HyPOTrainer's "
                         "eval_prompts=); with dataset set, the bundled task's are not used")
    check_run_sources(sources, skip_bad_rows=config.skip_bad_rows)
    if sources.judge:
        check_judge(sources.judge)


def check_model_path(name_or_path: str, option: str, gguf_file: str | None = None) -> None:
    """A local path must exist; a name shaped like a hub id (`name` or `org/name`) is left to the hub."""
    from hypo.models.gguf import embedded_gguf_path

    if name_or_path in ("", DEFAULT_MODEL):
        embedded_gguf_path()  # the embedded model's package is installed
        return
    path = Path(name_or_path).expanduser()
    if gguf_file:
        path = path / gguf_file
    if path.exists():
        return
    if gguf_file or name_or_path.endswith(".gguf") or not HUB_REPO_ID.match(name_or_path):
        raise FileNotFoundError(f"{option}: {path} does not exist")


def check_judge(name: str) -> None:
    """A registered name, or `rm:<path>` whose local path exists (a hub id is left to the hub)."""
    from hypo.evaluation.judges import available_judges

    if name.startswith("rm:"):
        check_model_path(name[3:], f"judge {name}")
        return
    if name not in available_judges():
        raise ValueError(f"unknown judge {name!r}; known judges: {', '.join(available_judges())}, "
                         "or rm:<reward model path>")


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
