"""What a run saves, and resuming from it.

A checkpoint `checkpoint-N/` is the model in Hugging Face format (loadable with `from_pretrained`, as the
final `model/`; LoRA: merged, with the adapter in `adapter/`) plus `training_state/`, written by
accelerate's `save_state`: optimizer, learning-rate schedule, the random states of every process, and
the `TrainerState` (step, reference log-prob cache). Model weights are written once, in the Hugging
Face files; a resumed run loads the policy from them. The data position is not stored: it follows from
the step (see `hypo.data.batches.ShuffledBatches`). A checkpoint is written under a temporary name and renamed
when complete, so a run killed while saving never leaves a half-written `checkpoint-N/`.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """The loop's own state, saved with each checkpoint (accelerate's `register_for_checkpointing`)."""

    step: int = 0
    ref_cache: dict[int, tuple[float, float]] | None = field(default_factory=dict)
    kl_budget: Any = None  # with target_kl: the `hypo.training.kl_budget.KLBudget` (the state it keeps)

    def state_dict(self) -> dict:
        budget = self.kl_budget.state_dict() if self.kl_budget is not None else None
        return {"step": self.step, "ref_cache": self.ref_cache, "kl_budget": budget}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.ref_cache = state["ref_cache"]
        if self.kl_budget is not None and state.get("kl_budget") is not None:
            self.kl_budget.load_state_dict(state["kl_budget"])


def save_pretrained(model, tokenizer, directory: Path, state_dict: dict | None = None) -> Path:
    """Hugging Face format (loadable with from_pretrained); LoRA adapters are saved merged, and as an
    adapter folder beside it. `state_dict`: the full weights when the model itself is sharded.

    The merged LoRA model is built on the CPU in float32, one weight at a time from the model on its device
    (`hypo.models.merging.merged_lora_tensors`): no copy of the model on the GPU (a deep copy to merge
    took as much again as the base: 32 GB at 8B in float32), no merged delta rounded to a bfloat16 base. It
    takes the model's size in float32 of host memory while it is written."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload") and state_dict is not None:  # a sharded peft model: no full copy to merge
        model.save_pretrained(directory / "adapter", state_dict=state_dict)
        logger.warning("%s: LoRA under sharding: only the adapter is written (merge it with peft's "
                       "PeftModel.from_pretrained(base, adapter).merge_and_unload())", directory)
    elif hasattr(model, "merge_and_unload"):  # a peft model
        from hypo.models.merging import merged_lora_tensors

        model.save_pretrained(directory / "adapter")
        merged = dict(merged_lora_tensors(model, dtype=torch.float32, device="cpu"))
        base = model.get_base_model()
        base.save_pretrained(directory, safe_serialization=True, state_dict=merged)
        set_saved_dtype(directory, "float32")
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    return directory


def set_saved_dtype(directory: Path, dtype: str) -> None:
    """Record in a saved model's config.json the dtype its weights were written in (a merged LoRA model is
    written in float32 whatever its base's dtype; `from_pretrained(dtype="auto")` reads this)."""
    import json

    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(accelerator, policy, tokenizer, directory: Path) -> None:
    """The main process writes the policy and the tokenizer; every process joins (under FSDP2 / ZeRO-3
    the full weights are gathered from all of them first)."""
    from hypo.runtime.distributed import full_state_dict, is_sharded

    model = accelerator.unwrap_model(policy)
    state_dict = full_state_dict(accelerator, policy) if is_sharded(model) else None  # collective
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pretrained(model, tokenizer, directory, state_dict)
    accelerator.wait_for_everyone()


def skip_model_weights(accelerator) -> None:
    """Let `save_state` / `load_state` leave the model weights alone: they live in the Hugging Face files."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save_checkpoint(accelerator, policy, tokenizer, output_dir: Path, step: int, save_total_limit: int | None,
                    protect: Path | None = None) -> Path:
    """`output_dir/checkpoint-<step>`, complete or absent: every process writes into a temporary folder
    (accelerate writes each process's random state), the main process renames it, then deletes the
    oldest checkpoints beyond `save_total_limit`, never `protect` (the state a KL budget keeps)."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a run killed while saving
    save_model(accelerator, policy, tokenizer, partial)
    accelerator.save_state(str(partial / STATE_DIR))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if save_total_limit:
            for old in [c for c in list_checkpoints(output_dir) if c != protect][:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: Path) -> Path:
    """`latest` (the newest complete checkpoint of `output_dir`) or a checkpoint folder, checked."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"resume_from_checkpoint latest: no checkpoint-N folder in {output_dir}")
        path = checkpoints[-1]
    else:
        path = Path(resume_from_checkpoint)
    if not (path / STATE_DIR).is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (it needs config.json and {STATE_DIR}/, "
                                "written by hypo train --save_steps N)")
    return path


def checkpoint_step(path: Path) -> int:
    match = _CHECKPOINT.match(path.name)
    if not match:
        raise ValueError(f"{path}: a checkpoint folder is named checkpoint-<step>")
    return int(match.group(1))


RESUMABLE_CHANGES = frozenset({
    "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "save_steps", "save_total_limit",
    "logging_steps", "report_to", "num_threads", "eval_at_end", "eval_steps", "eval_max_prompts",
    "eval_num_samples", "eval_batch_size", "eval_max_prompts_during_training", "ddp_timeout", "vllm_enable_sleep_mode",
})
"""Options a resumed run may change; any other difference from the saved config.json is an error."""


def holds_run(directory: Path) -> bool:
    """Whether a folder holds (part of) a hypo run: its config, metrics, model or a checkpoint."""
    if not directory.is_dir():
        return False
    return any((directory / name).exists() for name in ("config.json", "metrics.jsonl", "model")) or \
        bool(list_checkpoints(directory))


def run_folder(config) -> tuple[Path, Path | None]:
    """The run folder of a `HyPOConfig` and the checkpoint to resume from (None for a new run). Checks,
    before anything is written: a new run never mixes with an old one in the same folder; a resumed run
    continues the run that made the checkpoint, under the same settings."""
    import json
    from datetime import datetime

    if config.output_dir:
        output_dir = Path(config.output_dir)
    elif config.resume_from_checkpoint:
        output_dir = Path(config.resume_from_checkpoint).parent
    else:
        output_dir = Path("runs") / f"{config.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if config.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(config.resume_from_checkpoint, output_dir)
        saved_path = output_dir / "config.json"
        if not saved_path.is_file():
            raise FileNotFoundError(f"cannot resume into {output_dir}: no config.json of the run there")
        saved, current = json.loads(saved_path.read_text()), config.to_dict()
        changed = sorted(k for k in saved if k in current and k not in RESUMABLE_CHANGES and saved[k] != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
            raise ValueError(f"resuming {checkpoint} with settings other than the run's ({saved_path}): {details}")
        return output_dir, checkpoint
    if holds_run(output_dir) and not config.overwrite_output_dir:
        raise ValueError(f"{output_dir} already holds a run; continue it with --resume_from_checkpoint latest, "
                         "choose another --output_dir, or pass --overwrite_output_dir (the old run is moved aside)")
    return output_dir, None


def move_aside(output_dir: Path) -> Path | None:
    """Move a previous run out of the way (`<output_dir>.previous-<time>`) instead of deleting it."""
    from datetime import datetime

    if not holds_run(output_dir):
        return None
    target = output_dir.with_name(f"{output_dir.name}.previous-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
    output_dir.rename(target)
    logger.warning("%s held a run: moved it to %s", output_dir, target)
    return target
