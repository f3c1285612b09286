"""`hypo sft`: the supervised fine-tuning step of recipes that start from an SFT model (the paper's TL;DR setting
fine-tunes Pythia on `trl-lib/tldr` before DPO / HyPO), on TRL's `SFTTrainer`.

hypo adds only glue: a small typed config (TRL's names), hypo's data reading (files, folders, hub datasets with
splits and configurations; a bad row is an error naming the row), mixed precision as in `hypo train` (float32
weights, `mixed_precision` auto = bf16 on GPUs), the CPU settings TRL needs there, and the same output layout
as `hypo train` (`<output_dir>/model` with the tokenizer and a model card), so the SFT model is the
`model_name_or_path` of the next step. Rows: prompt-completion (`prompt` + `completion`, strings or messages),
conversational (`messages`) or plain text (`text`); with prompt-completion data the loss is on the completion
only, and TRL ends each completion with EOS, which the policy must learn to emit for HyPO's samples to stop.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hypo.config import DEFAULT_MODEL, check_config, optimization_problems, same_as


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class SFTRunConfig:
    """Everything one `hypo sft` run needs. Saved as `sft_config.json` beside the model. Options shared with
    `hypo train` mean the same there (`same_as`: the same help and checks); the defaults differ where SFT's do."""

    model_name_or_path: str = _help("Base model: a hub id, a local folder, a .gguf file or the embedded model.",
                                    DEFAULT_MODEL)
    dataset: str | None = _help("SFT data: prompt/completion, messages or text rows; a file, folder or hub name.")
    dataset_split: str = same_as("dataset_split")
    dataset_config: str | None = same_as("dataset_config")
    max_length: int = _help("Longest tokenized example; longer ones are truncated (TRL's max_length).", 1024)
    completion_only_loss: bool = _help("Prompt-completion data: loss on the completion tokens only.", True)
    learning_rate: float = same_as("learning_rate")
    per_device_train_batch_size: int = same_as("per_device_train_batch_size", 8)
    gradient_accumulation_steps: int = same_as("gradient_accumulation_steps")
    num_train_epochs: float = same_as("num_train_epochs")
    max_steps: int = same_as("max_steps", -1)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = same_as(
        "lr_scheduler_type", "cosine")
    warmup_ratio: float = same_as("warmup_ratio", 0.03)
    weight_decay: float = same_as("weight_decay")
    max_grad_norm: float = same_as("max_grad_norm")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = same_as("mixed_precision")
    dtype: Literal["float32", "bfloat16", "auto"] = _help("Weights dtype; keep float32 (see hypo train --help).",
                                                          "float32")
    gradient_checkpointing: bool = same_as("gradient_checkpointing")
    use_peft: bool = _help("Train LoRA adapters (merged into the saved model; the adapter is kept too).", False)
    lora_r: int = same_as("lora_r")
    lora_alpha: int = same_as("lora_alpha")
    lora_dropout: float = same_as("lora_dropout")
    lora_target_modules: str = same_as("lora_target_modules")
    seed: int = same_as("seed")
    output_dir: str | None = _help("Run folder (model in <output_dir>/model); default runs/sft-<time>.")
    logging_steps: int = same_as("logging_steps", 10)
    save_steps: int = _help("Save a TRL checkpoint every N steps (0: only the final model).", 0)
    report_to: str = _help("Trackers for TRL: none, tensorboard, wandb, ...", "none")
    push_to_hub: bool = _help("Upload <output_dir>/model with its model card to the Hugging Face Hub.", False)
    hub_model_id: str | None = same_as("hub_model_id")
    hub_private_repo: bool = same_as("hub_private_repo")

    def __post_init__(self) -> None:
        check_config(self, _problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _problems(c: SFTRunConfig):
    if not c.dataset:
        yield "dataset is required (prompt/completion, messages or text rows)"
    if c.max_length < 1:
        yield f"max_length must be >= 1, got {c.max_length}"
    if not 0 <= c.lora_dropout < 1:
        yield f"lora_dropout must be in [0, 1), got {c.lora_dropout}"
    yield from optimization_problems(c)


# --- data ------------------------------------------------------------------------------------------------------


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _row_columns(row: Any, where: str) -> tuple[str, ...]:
    """The columns TRL trains on in this row: (prompt, completion), (messages,) or (text,)."""
    from hypo.data.files import DataError

    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not (isinstance(value, str) and value.strip()) and not _is_messages(value):
                raise DataError(f"{where}: field '{name}': expected a non-empty string or a list of "
                                "{role, content} messages")
        if isinstance(prompt, str) != isinstance(completion, str):
            raise DataError(f"{where}: fields 'prompt' and 'completion': one is a string and the other a message "
                            "list (mixed formats)")
        return ("prompt", "completion")
    if "messages" in row:
        if not _is_messages(row["messages"]):
            raise DataError(f"{where}: field 'messages': expected a list of {{role, content}} messages")
        return ("messages",)
    if isinstance(row.get("text"), str) and row["text"].strip():
        return ("text",)
    raise DataError(f"{where}: expected prompt + completion, messages, or text")


def load_sft_rows(source: str, *, split: str = "train", config_name: str | None = None) -> list[dict[str, Any]]:
    """The rows of an SFT source, each reduced to the columns TRL trains on; every row must have the same
    ones. Raises `hypo.data.files.DataError` naming the row."""
    from hypo.data.files import DataError, read_located_rows

    rows, wheres = read_located_rows(source, split=split, strict=False, config_name=config_name)
    if not rows:
        raise DataError(f"{source}: no rows")
    first = _row_columns(rows[0], wheres[0])
    kept = []
    for row, where in zip(rows, wheres, strict=True):
        columns = _row_columns(row, where)
        if columns != first:
            raise DataError(f"{where}: has {', '.join(columns)}, but {wheres[0]} has {', '.join(first)}: a dataset "
                            "must use one format")
        kept.append({name: row[name] for name in columns})
    return kept


# --- the run ---------------------------------------------------------------------------------------------------


def trl_sft_args(config: SFTRunConfig, output_dir: Path) -> dict[str, Any]:
    """SFTConfig keyword arguments: `hypo.training.trl_args.trl_training_args` (precision, warm-up and the CPU
    settings as in `hypo train`) plus SFT's own (length, completion-only loss, logging, saving, trackers)."""
    from hypo.training.trl_args import trl_training_args

    return {
        **trl_training_args(config), "output_dir": str(output_dir), "max_length": config.max_length,
        "completion_only_loss": config.completion_only_loss,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "num_train_epochs": config.num_train_epochs, "logging_steps": config.logging_steps,
        "save_strategy": "steps" if config.save_steps else "no", "save_steps": config.save_steps or 500,
        "report_to": config.report_to,
    }


@dataclass
class SFTResult:
    output_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    train_loss: float | None


def sft(config: SFTRunConfig) -> SFTResult:
    """Fine-tune `config.model_name_or_path` on `config.dataset` with TRL's SFTTrainer; save the model and
    tokenizer to `<output_dir>/model` with a model card (and push it when asked)."""
    import json

    import datasets
    from trl import SFTConfig, SFTTrainer

    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    output_dir = Path(config.output_dir or f"runs/sft-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = load_sft_rows(config.dataset, split=config.dataset_split, config_name=config.dataset_config)
    model_path = resolve_model_path(config.model_name_or_path)
    tokenizer = load_tokenizer(model_path)
    tokenizer.padding_side = "right"
    model = load_causal_lm(model_path, config.dtype)
    peft_config = None
    if config.use_peft:
        from peft import LoraConfig

        targets = config.lora_target_modules
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 task_type="CAUSAL_LM",
                                 target_modules=targets if targets == "all-linear" else targets.split(","))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "sft_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    trainer = SFTTrainer(model=model, args=SFTConfig(**trl_sft_args(config, output_dir)),
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    model_dir = output_dir / "model"
    if trainer.accelerator.is_main_process:
        _save(trainer, tokenizer, model_dir, config)
    trainer.accelerator.wait_for_everyone()
    return SFTResult(output_dir, model_dir, output.global_step, seconds, output.metrics.get("train_loss"))


def _save(trainer, tokenizer, model_dir: Path, config: SFTRunConfig) -> None:
    from hypo.training.hub import ModelCard, base_model_name, hub_repo_id, push_model, write_model_card

    model = trainer.accelerator.unwrap_model(trainer.model)
    if config.use_peft:
        model.save_pretrained(model_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(model_dir)
    tokenizer.padding_side = "left"  # as hypo loads it
    tokenizer.save_pretrained(model_dir)
    repo_id = hub_repo_id(config.hub_model_id, model_dir.parent)
    source = f"`{config.dataset}` (split `{config.dataset_split}`" + \
        (f", configuration `{config.dataset_config}`)" if config.dataset_config else ")")
    keys = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "per_device_train_batch_size",
            "gradient_accumulation_steps", "num_train_epochs", "max_steps", "max_length", "completion_only_loss",
            "mixed_precision", "dtype", "use_peft", "seed")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    results = [f"Last logged training loss: {losses[-1]:.4g} (step {trainer.state.global_step})."] if losses else []
    card = ModelCard(name=repo_id, method="sft", base_model=base_model_name(config.model_name_or_path),
                     data={"SFT data": source}, hyperparameters={k: getattr(config, k) for k in keys},
                     results=results,
                     hub_datasets=[config.dataset] if "/" in config.dataset and not Path(config.dataset).exists() else [])
    write_model_card(model_dir, card)
    if config.push_to_hub:
        push_model(model_dir, repo_id, private=config.hub_private_repo, commit_message="hypo sft")
