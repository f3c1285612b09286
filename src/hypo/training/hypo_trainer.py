"""`HyPOTrainer`: TRL's `DPOTrainer` shape for HyPO and DPO, for users who hold their objects in memory.

    trainer = HyPOTrainer(model=model, args=HyPOConfig(kl_coef=0.05, max_steps=100), processing_class=tokenizer,
                          train_dataset=pairs, prompt_dataset=prompts, eval_prompts=held_out,
                          callbacks=[MyCallback()])
    trainer.train()
    metrics = trainer.evaluate()      # eval_objective/kl, eval_win_rate, eval_loss, ...
    trainer.save_model("my-model")    # Hugging Face format (LoRA: merged, adapter in adapter/)

Each of `model`, `ref_model`, the datasets may be an object or a path / hub name (which then goes into the config,
as `hypo train` takes it); objects take the place of the config's paths and must not contradict them. Rows in
memory (a `datasets.Dataset` or a list of dicts) pass the checks of files, their errors naming the dataset and the
row; everything is checked when the trainer is built, before any model loads. The set-up (`prepare_run`: models,
data, optimizer, run folder) happens on the first `train()`, `evaluate()` or `save_model()`. `hypo.train(config)`
and `hypo train` run `HyPOTrainer(args=config).train()`: there is one loop (`hypo.training.trainer.run_training`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from hypo.config import HyPOConfig
from hypo.data.sources import IN_MEMORY_NAMES, InMemoryRows, in_memory_fingerprints, in_memory_rows
from hypo.models.loading import GivenModels, is_peft_model, model_source_path
from hypo.training.callbacks import TrainingEvents
from hypo.training.checkpoints import run_folder, save_model
from hypo.training.hub import hub_repo_id, push_model, training_card, write_model_card
from hypo.training.preflight import check_run_inputs
from hypo.training.setup import Run, RunInputs, prepare_run
from hypo.training.trainer import LoopInputs, RunResult, card_notes, evaluate, run_training

IN_MEMORY_FILE = "in_memory_data.json"
"""In the run folder: name, row count and SHA-256 of each dataset handed over in memory (a resumed run checks them)."""
_DATASETS = (  # (role, argument, config field of its path)
    ("pairs", "train_dataset", "dataset"), ("prompts", "prompt_dataset", "prompts"),
    ("eval_prompts", "eval_prompts", "eval_prompts"), ("eval_pairs", "eval_dataset", "eval_dataset"))
_CARD_ROLES = {"pairs": "preference pairs", "prompts": "unlabeled prompts (online KL term)",
               "eval_prompts": "held-out prompts", "eval_pairs": "held-out preference pairs"}


class HyPOTrainer:
    """HyPO (or DPO, `args.method`) with the arguments and methods of TRL's `DPOTrainer`.

    - `model`: a path or hub id, or a loaded causal LM (a transformers model or a peft `PeftModel`); None: the
      config's `model_name_or_path`.
    - `ref_model`: the frozen reference; None: a frozen deep copy of the initial model, or under LoRA the base with
      its adapters disabled (then no reference may be given).
    - `args`: a `HyPOConfig` (TRL's option names: `beta`, `learning_rate`, `per_device_train_batch_size`, ...).
    - `processing_class`: the tokenizer; None: loaded from where the model was loaded from.
    - `train_dataset` (preference pairs), `prompt_dataset` (unlabeled prompts of the online term; None: the pairs'
      prompts), `eval_dataset` (held-out pairs: `eval_loss`, `eval_rewards/*`), `eval_prompts` (held-out prompts:
      the reverse KL to the reference and the judged win rate): a `datasets.Dataset`, a list of dicts in TRL's
      formats, or a path / hub name.
    - `peft_config`: a peft config (e.g. `LoraConfig`) to train adapters with.
    - `callbacks`: transformers `TrainerCallback`s (instances or classes), see `hypo.training.callbacks`.
    """

    def __init__(self, model: Any = None, ref_model: Any = None, args: HyPOConfig | None = None,
                 processing_class: Any = None, train_dataset: Any = None, prompt_dataset: Any = None,
                 eval_dataset: Any = None, eval_prompts: Any = None, peft_config: Any = None,
                 callbacks: list | None = None) -> None:
        self.args, self._models, self._rows = resolve_inputs(
            args if args is not None else HyPOConfig(), model=model, ref_model=ref_model,
            processing_class=processing_class, peft_config=peft_config,
            datasets={"train_dataset": train_dataset, "prompt_dataset": prompt_dataset, "eval_prompts": eval_prompts,
                      "eval_dataset": eval_dataset})
        model_object, ref_object = self._models.model, self._models.ref_model
        if self.args.use_vllm and model_object is not None and model_source_path(model_object) is None:
            raise ValueError("use_vllm: the vLLM engine loads the model's architecture from its path, and this model "
                             "does not say where it was loaded from (model.name_or_path)")
        # every row, the judge, the paths, rows per batch; tokenized by the tokenizer alone: no model loaded yet
        self._data = check_run_inputs(self.args, self._rows, self._models)
        self._events = TrainingEvents(callbacks, self.args)
        self._loop = LoopInputs(
            self._events, reference_is_initial_policy=ref_object is None and not self.args.ref_model_name_or_path
            and not is_peft_model(model_object), card_data=self._card_data())
        self._run: Run | None = None
        self._trained = False
        self._last_eval: tuple[dict | None, dict | None] = (None, None)
        self._final_metrics: dict[str, float] | None = None
        self._events.call("on_init_end")

    # --- TRL's methods ------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> RunResult:
        """Train (the loop of `hypo train`), save `<output_dir>/model`, evaluate it when `eval_at_end`, and return
        a `RunResult`. `resume_from_checkpoint`: a `checkpoint-N` folder, or True / "latest" for the newest in
        `output_dir`: the run continues as if it had not stopped (with a model object: hand over the same
        initial model and data; the checkpoint's weights are loaded into it)."""
        if self._trained:
            raise RuntimeError("this HyPOTrainer has trained already; build a new one to train again")
        resume = "latest" if resume_from_checkpoint is True else (str(resume_from_checkpoint)
                                                                  if resume_from_checkpoint else None)
        run = self._setup(resume)
        self._trained = True
        try:
            result = run_training(run, self._loop)
        finally:
            run.close()
        self._last_eval, self._final_metrics = (result.eval, result.eval_pairs), result.final_metrics
        return result

    def evaluate(self) -> dict[str, float]:
        """Evaluate the current policy now, as at the end of training (on `eval_max_prompts` held-out prompts, and
        the held-out pairs; eval_results.json, eval_samples.jsonl and eval_report.md in `output_dir`), and return
        the metrics under TRL's `eval_` names: eval_objective/kl (with eval_objective/kl_se), eval_win_rate, ...,
        eval_loss, eval_rewards/*. Callbacks get them in `on_evaluate`."""
        run = self._setup(None)
        if not run.data.eval_prompts and not run.data.eval_pairs:
            raise ValueError("nothing to evaluate: give eval_prompts or eval_dataset (the run reads them only when it "
                             "evaluates: eval_at_end or eval_steps)")
        results, pair_metrics, metrics = evaluate(run, self._events.state.global_step, self._loop.reference_samples,
                                                  self._events, final=True)
        self._last_eval = (results, pair_metrics)
        return metrics

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the policy and the tokenizer in Hugging Face format (LoRA: merged, the adapter in `adapter/`) with
        a model card to `output_dir` (default `<args.output_dir>/model`, where training saves it). Every process
        must call it. Returns the folder."""
        run = self._setup(None)
        directory = Path(output_dir) if output_dir is not None else run.output_dir / "model"
        save_model(run.accelerator, run.policy, run.tokenizer, directory)
        if run.accelerator.is_main_process:
            results, pair_metrics = self._last_eval
            write_model_card(directory, training_card(
                run.config, name=hub_repo_id(run.config.hub_model_id, run.output_dir), eval_results=results,
                pair_metrics=pair_metrics, final_metrics=self._final_metrics,
                num_processes=run.accelerator.num_processes, notes=card_notes(run),
                data=self._loop.card_data))
        run.accelerator.wait_for_everyone()
        return directory

    def push_to_hub(self, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None) -> str | None:
        """Save the model (`save_model()`) and upload `<output_dir>/model` to the Hub repository `hub_model_id`
        (default: the run folder's name); `private` defaults to `hub_private_repo`. Returns the repository URL on
        the main process (None elsewhere)."""
        directory = self.save_model()
        run, url = self._run, None
        if run.accelerator.is_main_process:
            url = push_model(directory, hub_repo_id(run.config.hub_model_id, run.output_dir),
                             private=run.config.hub_private_repo if private is None else private, token=token,
                             commit_message=commit_message or f"hypo HyPOTrainer, method {run.config.method}")
        run.accelerator.wait_for_everyone()
        return url

    def add_callback(self, callback) -> None:
        self._events.add(callback)

    def remove_callback(self, callback) -> None:
        self._events.remove(callback)

    def pop_callback(self, callback):
        return self._events.remove(callback)

    # --- what a TRL user reads off a trainer -------------------------------------------------------------------

    @property
    def model(self):
        """The policy (unwrapped; a PeftModel under LoRA) once set up, else the model given (None for a path)."""
        return self._run.accelerator.unwrap_model(self._run.policy) if self._run else self._models.model

    @property
    def ref_model(self):
        """The frozen reference model (None under LoRA: the policy with adapters disabled)."""
        return self._run.reference.model if self._run else self._models.ref_model

    @property
    def processing_class(self):
        return self._run.tokenizer if self._run else self._models.tokenizer

    @property
    def accelerator(self):
        return self._run.accelerator if self._run else None

    @property
    def optimizer(self):
        return self._run.optimizer if self._run else None

    @property
    def lr_scheduler(self):
        return self._run.scheduler if self._run else None

    @property
    def state(self):
        """transformers' `TrainerState` (global_step, epoch, log_history, ...)."""
        return self._events.state

    @property
    def callback_handler(self) -> TrainingEvents:
        return self._events

    # --- set-up -----------------------------------------------------------------------------------------------

    def _setup(self, resume: str | None) -> Run:
        """The run, set up once (models, data, optimizer, run folder); resuming loads the checkpoint's state."""
        if self._run is not None:
            if resume:
                raise ValueError("resume_from_checkpoint: this trainer is set up already (evaluate() or save_model() "
                                 "ran before train()); pass it to a new trainer's first train()")
            return self._run
        config = dataclasses.replace(self.args, resume_from_checkpoint=resume) if resume else self.args
        output_dir, checkpoint = run_folder(config)  # checks only; prepare_run repeats them
        given = in_memory_fingerprints(self._rows)
        if checkpoint is not None:
            saved_path = output_dir / IN_MEMORY_FILE
            saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
            if saved != given:
                raise ValueError(f"resuming {checkpoint} with other in-memory data than the run's ({saved_path}): "
                                 f"{saved} -> {given}")
        run = prepare_run(config, RunInputs(self._models, self._rows, self._data))
        if checkpoint is None and given and run.accelerator.is_main_process:
            (run.output_dir / IN_MEMORY_FILE).write_text(json.dumps(given, indent=2) + "\n")
        run.logger.listeners.append(self._events.log)
        self._events.bind(run)
        self.args, self._run = config, run
        return run

    def _card_data(self) -> dict[str, str]:
        """The model card's lines for datasets handed over in memory."""
        prints, out = in_memory_fingerprints(self._rows), {}
        for role, name in IN_MEMORY_NAMES.items():
            if name in prints and not (role == "prompts" and self.args.method != "hypo"):
                out[_CARD_ROLES[role]] = f"`{name}`, {prints[name]['rows']} rows handed over in memory (SHA-256 " \
                                         f"of the rows {prints[name]['sha256'][:12]})"
        return out


def resolve_inputs(config: HyPOConfig, *, model, ref_model, processing_class, peft_config,
                   datasets: dict[str, Any]) -> tuple[HyPOConfig, GivenModels, InMemoryRows]:
    """The trainer's arguments sorted out: paths and hub names go into the config (as `hypo train` takes them),
    objects into `GivenModels` / `InMemoryRows`; the config records where a loaded model came from and the LoRA
    settings of a peft config. An argument that contradicts `config` is an error."""
    if not isinstance(config, HyPOConfig):
        raise TypeError(f"args must be a hypo.HyPOConfig (TRL's option names: HyPOConfig(beta=0.1, "
                        f"learning_rate=5e-7, ...)), got {type(config).__name__}")
    overrides: dict[str, Any] = {}
    model_object = _path_or_object(config, model, "model", "model_name_or_path", overrides)
    ref_object = _path_or_object(config, ref_model, "ref_model", "ref_model_name_or_path", overrides)
    rows: dict[str, Any] = {}
    for role, argument, config_field in _DATASETS:
        value = datasets[argument]
        if isinstance(value, (str, os.PathLike)):
            _once(config, config_field, str(value), argument, repr(str(value)))
            overrides[config_field] = str(value)
        elif value is not None:
            _once(config, config_field, None, argument, "in memory")
            rows[role] = in_memory_rows(value, argument)
    if peft_config is not None:
        if config.use_peft or is_peft_model(model_object):
            raise ValueError("peft_config asks for LoRA, and so does args.use_peft or the PeftModel given: give its "
                             "settings once")
        overrides.update(use_peft=True, **_lora_fields(peft_config))
    elif is_peft_model(model_object):  # config.json and the model card say what is trained
        overrides.update(use_peft=True, **_lora_fields(model_object.peft_config.get("default")))
    resolved = dataclasses.replace(config, **overrides) if overrides else config
    return resolved, GivenModels(model_object, ref_object, processing_class, peft_config), InMemoryRows(**rows)


def _once(config: HyPOConfig, config_field: str, value: str | None, argument: str, what: str) -> None:
    """An argument of the trainer must not contradict the config (`args`): give one of them, or the same."""
    current = getattr(config, config_field)
    if current not in (None, HyPOConfig.__dataclass_fields__[config_field].default, value):
        raise ValueError(f"{argument} is {what} but args.{config_field} is {current!r}: give it once")


def _path_or_object(config: HyPOConfig, value: Any, argument: str, config_field: str,
                    overrides: dict[str, Any]) -> Any:
    """A model argument: a path or hub id goes into the config (returns None); a loaded model is returned, and the
    config records where it was loaded from (informational: the object is used)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        _once(config, config_field, str(value), argument, repr(str(value)))
        overrides[config_field] = str(value)
        return None
    if not callable(getattr(value, "forward", None)):
        raise TypeError(f"{argument}: expected a path, a hub id or a loaded causal LM, got {type(value).__name__}")
    source = model_source_path(value)
    _once(config, config_field, source, argument, "a loaded model")  # the config may name where it was loaded from
    if config_field == "model_name_or_path":
        overrides[config_field] = source or "<in-memory model>"
    return value


def _lora_fields(peft_config) -> dict[str, Any]:
    """The HyPOConfig LoRA fields a peft config sets (recorded in config.json and the model card)."""
    fields: dict[str, Any] = {}
    if isinstance(getattr(peft_config, "r", None), int):
        fields["lora_r"] = peft_config.r
    if isinstance(getattr(peft_config, "lora_alpha", None), int):
        fields["lora_alpha"] = peft_config.lora_alpha
    if isinstance(getattr(peft_config, "lora_dropout", None), (int, float)):
        fields["lora_dropout"] = float(peft_config.lora_dropout)
    targets = getattr(peft_config, "target_modules", None)
    if isinstance(targets, str):
        fields["lora_target_modules"] = targets
    elif targets:
        fields["lora_target_modules"] = ",".join(sorted(targets))
    return fields


__all__ = ["HyPOTrainer", "RunResult"]
