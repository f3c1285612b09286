"""The changes that make a run that does not fit its GPUs fit: tried one at a time, then together in order."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from hypo.config import HyPOConfig
from hypo.planning.memory import Launch, Plan, memory_plan


@dataclass(frozen=True)
class Change:
    """One change of a run's options, and what it costs."""

    name: str
    cost: str
    apply: Callable[[HyPOConfig], HyPOConfig | None]  # None where the change does not apply


def flags(before: HyPOConfig, after: HyPOConfig) -> str:
    """The `hypo train` flags that turn `before` into `after`.

    Example: gradient_checkpointing False -> True: "--gradient_checkpointing true".
    """
    def spell(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    changed = [f.name for f in dataclasses.fields(after) if getattr(before, f.name) != getattr(after, f.name)]
    return " ".join(f"--{name} {spell(getattr(after, name))}" for name in changed if getattr(after, name) is not None)


def _set(**values) -> Callable[[HyPOConfig], HyPOConfig | None]:
    def apply(config: HyPOConfig) -> HyPOConfig | None:
        if all(getattr(config, k) == v for k, v in values.items()):
            return None
        return dataclasses.replace(config, **values)

    return apply


def _halve_micro_batch(config: HyPOConfig) -> HyPOConfig | None:
    """Half the rows per micro-step, twice the micro-steps: the same pairs and prompts per optimizer step."""
    if config.per_device_train_batch_size < 2 or config.per_device_train_batch_size % 2:
        return None
    prompts = config.per_device_prompt_batch_size
    if config.method == "hypo" and (prompts < 2 or prompts % 2):
        return None
    return dataclasses.replace(config, per_device_train_batch_size=config.per_device_train_batch_size // 2,
                               per_device_prompt_batch_size=prompts // 2 if config.method == "hypo" else prompts,
                               gradient_accumulation_steps=2 * config.gradient_accumulation_steps)


def _bf16_lora_base(config: HyPOConfig) -> HyPOConfig | None:
    if not config.use_peft or config.dtype != "float32":
        return None
    return dataclasses.replace(config, dtype="bfloat16")


def _sleep(config: HyPOConfig) -> HyPOConfig | None:
    if not (config.method == "hypo" and config.use_vllm and config.vllm_mode == "colocate"):
        return None
    return _set(vllm_enable_sleep_mode=True)(config)


def _smaller_evaluation(config: HyPOConfig) -> HyPOConfig | None:
    if config.eval_batch_size < 2 or not (config.eval_at_end or config.eval_steps):
        return None
    return dataclasses.replace(config, eval_batch_size=config.eval_batch_size // 2,
                               per_device_eval_batch_size=max(1, config.per_device_eval_batch_size // 2))


CHANGES = [
    Change("gradient checkpointing", "recomputes the forward in the backward (about 1/3 more compute)",
           _set(gradient_checkpointing=True)),
    Change("fused output layer", "TRL's; needs trl", _set(fused_lm_head=True, share_prompt_forward=None)),
    Change("bf16 LoRA base", "the frozen base in bf16; the adapters stay float32", _bf16_lora_base),
    Change("vLLM sleep mode", "the engine reloads its weights after each sampling", _sleep),
    Change("smaller evaluation batches", "more evaluation batches", _smaller_evaluation),
    Change("smaller micro-steps", "the same batch in more, smaller micro-steps", _halve_micro_batch),
]
"""In the order they are tried together: the ones that change nothing of the result first."""


@dataclass
class Advice:
    alone: list[tuple[Change, str, Plan]]  # each change that makes the run fit by itself, its flags, the plan
    together: list[Change]  # the changes, in order, that together make it fit ([] if none do)
    together_flags: str  # their flags
    together_plan: Plan | None


def advise(config: HyPOConfig, plan: Plan, launch: Launch) -> Advice:
    """The changes of `CHANGES` that make `plan` fit: each alone, and the shortest prefix of them, applied in
    order (halving repeatedly), that fits together."""
    def replan(candidate: HyPOConfig) -> Plan:
        return memory_plan(candidate, plan.shape, launch, headroom_gb=plan.headroom_gb)

    alone = []
    for change in CHANGES:
        changed = change.apply(config)
        if changed is not None and (candidate := replan(changed)).fits:
            alone.append((change, flags(config, changed), candidate))
    together, current, current_plan = [], config, plan
    for change in CHANGES:
        repeat = 4 if change.apply is _halve_micro_batch or change.apply is _smaller_evaluation else 1
        for _ in range(repeat):
            changed = change.apply(current)
            if changed is None or current_plan.fits:
                break
            candidate = replan(changed)
            if candidate.peak < current_plan.peak:
                if change not in together:
                    together.append(change)
                current, current_plan = changed, candidate
        if current_plan.fits:
            return Advice(alone, together, flags(config, current), current_plan)
    return Advice(alone, [], "", None)
