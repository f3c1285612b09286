"""Checks of a run's inputs before any model loads or anything is written: every row of every data
source, the judge's name, the model paths, what the tokenizer refuses, and enough rows for one batch of
every kind. A newcomer's bad row 7 costs them no model load."""

from __future__ import annotations

from pathlib import Path

from hypo.config import DEFAULT_MODEL, HUB_REPO_ID, HyPOConfig
from hypo.data.files import DataError
from hypo.data.sources import (
    InMemoryRows,
    RunSources,
    TrainingData,
    check_run_sources,
    load_training_data,
    run_sources,
)
from hypo.models.loading import GivenModels


def check_run_inputs(config: HyPOConfig, given: InMemoryRows | None = None, models: GivenModels | None = None,
                     num_processes: int | None = None) -> TrainingData:
    """Raise a ValueError / FileNotFoundError naming the file (or in-memory dataset), row and field (data), the
    judge, the option or the model path that is wrong; return the run's tokenized data. The data and the judge
    are those the run will load (`run_sources`); models handed over loaded (`models`) have no path to check.
    Every row is first checked without a tokenizer; then the tokenizer alone (no model) tokenizes them, which
    finds prompts that leave no room within max_length, and the usable rows are counted against one batch on
    each of `num_processes` (default: the launcher's WORLD_SIZE)."""
    from hypo.models.loading import run_tokenizer, uses_lora
    from hypo.runtime.accelerator import launched_num_processes

    models = models or GivenModels()
    if models.model is None:
        check_model_path(config.model_name_or_path, "model_name_or_path", config.gguf_file)
        warn_if_checkpoint_starts_a_new_run(config)
    if config.ref_model_name_or_path and models.ref_model is None:
        check_model_path(config.ref_model_name_or_path, "ref_model_name_or_path")
    uses_lora(config, models)  # no reference model beside LoRA adapters
    sources = run_sources(config, given)
    if config.target_kl is not None and sources.eval_prompts is None:
        raise ValueError("target_kl is measured on held-out prompts: give eval_prompts (a path, or HyPOTrainer's "
                         "eval_prompts=); with dataset set, the bundled task's are not used")
    check_run_sources(sources, skip_bad_rows=config.skip_bad_rows)
    if sources.judge:
        check_judge(sources.judge)
    data = load_training_data(config, run_tokenizer(config, models), given)
    check_batches(config, data, sources, launched_num_processes() if num_processes is None else num_processes)
    return data


def check_batches(config: HyPOConfig, data: TrainingData, sources: RunSources, num_processes: int) -> None:
    """Every kind of batch the run draws has rows enough for one batch on each process (the loop takes full
    batches only), and the held-out pairs one pair per process: a DataError naming the file, the count and
    the option otherwise.

    Example: 3 usable pairs, per_device_train_batch_size 2, 2 processes -> "pairs.jsonl: 3 usable pairs are
    fewer than one batch on each process: per_device_train_batch_size 2 x 2 processes = 4 ..."
    """
    prompts_source = (f"{sources.pairs.path} (the distinct prompts of its pairs)" if sources.prompts_from_pairs
                      else sources.prompts.path if sources.prompts else None)
    batches = [(data.pairs, sources.pairs.path, "pairs", "per_device_train_batch_size",
                config.per_device_train_batch_size)]
    if data.prompts is not None:
        batches.append((data.prompts, prompts_source, "prompts", "per_device_prompt_batch_size",
                        config.per_device_prompt_batch_size))
    for items, source, what, option, size in batches:
        if len(items) < size * num_processes:
            raise DataError(f"{source}: {len(items)} usable {what} are fewer than one batch on each process: "
                            f"{option} {size} x {num_processes} process(es) = {size * num_processes}; lower "
                            f"{option} or add {what}")
    if data.eval_pairs is not None and len(data.eval_pairs) < num_processes:
        raise DataError(f"{sources.eval_pairs.path}: {len(data.eval_pairs)} usable held-out pairs"
                        f"{' (eval_max_pairs ' + str(config.eval_max_pairs) + ')' if config.eval_max_pairs else ''} "
                        f"for {num_processes} processes: each process scores at least one")


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
