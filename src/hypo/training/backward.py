"""How one micro-step's backward passes run under each engine: when gradients are all-reduced, and how
DeepSpeed's own accumulation is made to follow the loop's."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

from hypo.config import HyPOConfig

logger = logging.getLogger(__name__)


def runs_one_backward(accelerator, online: bool) -> bool:
    """DeepSpeed counts backward calls as micro-steps: there HyPO runs one backward of the summed loss
    instead of one per term."""
    from accelerate import DistributedType

    return online and accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_batch_settings(ds_config: dict[str, Any], *, micro_batch: int, accumulation: int) -> dict[str, int]:
    """The DeepSpeed config's micro-batch and gradient accumulation that differ from the run's (`auto` and
    absent ones included): the loop takes its batches itself (no dataloader tells accelerate the micro-batch),
    and DeepSpeed steps its optimizer after `gradient_accumulation_steps` backward calls, which must be the
    loop's micro-steps.

    Example: {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4}, micro_batch 2,
    accumulation 4 -> {"train_micro_batch_size_per_gpu": 2}.
    """
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation}
    return {key: value for key, value in wanted.items() if ds_config.get(key, "auto") != value}


def configure_deepspeed(accelerator, config: HyPOConfig) -> None:
    """Under DeepSpeed, before `prepare`: the engine gets the loop's micro-batch and accumulation (a DeepSpeed
    config that says otherwise is overridden, with a warning naming its values). Elsewhere nothing to do."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    changes = deepspeed_batch_settings(plugin.deepspeed_config, micro_batch=config.per_device_train_batch_size,
                                       accumulation=config.gradient_accumulation_steps)
    given = {key: plugin.deepspeed_config.get(key, "auto") for key in changes}
    if any(value != "auto" for value in given.values()):
        logger.warning("DeepSpeed config %s replaced by the run's %s", given, changes)
    plugin.deepspeed_config.update(changes)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps


def deepspeed_micro_step(accelerator, last_micro: bool) -> dict[str, Any]:
    """Under DeepSpeed, accelerate's `backward` steps the engine (and its optimizer, at DeepSpeed's accumulation
    boundary) when `sync_gradients` is set, and the engine divides the loss by its accumulation steps. The loop
    runs one backward per micro-step under DeepSpeed and divides the loss itself, so: mark the last micro-step
    of an optimizer step as the boundary, and turn the engine's division off (transformers' Trainer does both
    the same way). Returns the keyword arguments of `accelerator.backward`; elsewhere nothing to do."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {}
    accelerator.gradient_state._set_sync_gradients(last_micro)
    return {"scale_wrt_gas": False}


def gradient_sync(accelerator, model, sync: bool):
    """Under data parallelism, gradients are all-reduced only in the backward passes run with sync=True
    (the last of an optimizer step); elsewhere this is a no-op.

    Under FSDP2 every backward reduce-scatters: skipping it would keep each micro-step's gradients unsharded on
    every GPU until the last one (16 GB in bf16 for an 8B model, beside the 4 GB shard), for one reduce-scatter
    less per micro-step. The sums are the same (docs/design.md: precision and sharding)."""
    if sync or getattr(accelerator, "is_fsdp2", False):
        return nullcontext()
    return accelerator.no_sync(model)
