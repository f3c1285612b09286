"""TRL trainer arguments that match a `HyPOConfig`: the same optimizer, schedule, clipping and seed, so a
TRL baseline (`hypo bench`, `hypo lab rlhf`) trains under the settings of the hypo run beside it.

TRL is an optional dependency (the `trl` extra); this module only builds keyword dictionaries.
"""

from __future__ import annotations

from typing import Any

from hypo.config import HyPOConfig


def trl_training_args(config, *, max_steps: int | None = None) -> dict[str, Any]:
    """TrainingArguments fields shared by every TRL trainer, from a `HyPOConfig` (or `hypo sft`'s config):
    hypo's optimizer, schedule, clipping, seed and compute precision (on a GPU, Trainer's bf16/fp16 autocast as
    `mixed_precision` resolves; on a CPU fp32, where TRL's default bf16 is slower), activation checkpointing only
    when asked, no trackers, no checkpoints.

    Warm-up: `round(warmup_ratio * max_steps)` steps, as hypo's loop counts them, when the steps are known; with
    `max_steps` -1 (epochs) the ratio itself, which Trainer rounds up against the steps it counts.
    """
    import torch

    from hypo.runtime.precision import resolve_mixed_precision

    steps = config.max_steps if max_steps is None else max_steps
    precision = resolve_mixed_precision(config.mixed_precision)
    args = {
        "learning_rate": config.learning_rate, "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": round(config.warmup_ratio * steps) if steps > 0 else config.warmup_ratio,
        "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm, "seed": config.seed,
        "max_steps": steps, "logging_steps": 1, "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "report_to": "none", "save_strategy": "no", "activation_checkpointing": config.gradient_checkpointing,
        "dataloader_num_workers": 0,
    }
    args.update(bf16=precision == "bf16", fp16=precision == "fp16")
    if not torch.cuda.is_available():
        args.update(use_cpu=True)
    return args


def trl_rloo_args(config: HyPOConfig, **kwargs) -> dict[str, Any]:
    """RLOOConfig fields for HyPO's online work: k samples per prompt of the same length, exact draws from
    the policy (temperature 1, no truncation), `kl_coef` as RLOO's KL penalty (TRL calls it `beta`), the
    micro-steps sampled per generation call as hypo's (None: TRL's default, one call per optimizer step)."""
    import torch

    return {**trl_training_args(config, **kwargs),
            "per_device_train_batch_size": config.per_device_prompt_batch_size * config.num_generations,
            "num_generations": config.num_generations, "steps_per_generation": config.steps_per_generation,
            "max_completion_length": config.max_completion_length, "beta": config.kl_coef, "temperature": 1.0,
            "top_p": 1.0, "top_k": 0, "model_init_kwargs": {"dtype": torch.float32}}
