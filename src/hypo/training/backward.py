"""How one micro-step's backward passes run under each engine: when gradients are all-reduced, and how
DeepSpeed's own accumulation is made to follow the loop's."""

from __future__ import annotations

import logging
import math
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
    """Under DeepSpeed, before `prepare`: the engine gets the loop's micro-batch and accumulation, and clips the
    gradient at `max_grad_norm` (DeepSpeed's `gradient_clipping`, 0 = off); a DeepSpeed config that says
    otherwise is overridden, with a warning naming its values. Elsewhere nothing to do."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    changes = deepspeed_batch_settings(plugin.deepspeed_config, micro_batch=config.per_device_train_batch_size,
                                       accumulation=config.gradient_accumulation_steps)
    if plugin.deepspeed_config.get("gradient_clipping", "auto") != float(config.max_grad_norm):
        changes["gradient_clipping"] = float(config.max_grad_norm)
    given = {key: plugin.deepspeed_config.get(key, "auto") for key in changes}
    if any(value != "auto" for value in given.values()):
        logger.warning("DeepSpeed config %s replaced by the run's %s (gradient_clipping is max_grad_norm)", given,
                       changes)
    plugin.deepspeed_config.update(changes)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps


def uses_deepspeed(accelerator) -> bool:
    from accelerate import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def backward(accelerator, loss, *, last_micro: bool) -> None:
    """Backpropagate one term of a micro-step (the loop divides by the accumulation itself).

    Under DeepSpeed the engine's backward runs directly, with the last micro-step of an optimizer step marked
    as DeepSpeed's accumulation boundary (where ZeRO finishes reducing the gradients) and the engine's own
    division by its accumulation steps off (transformers' Trainer does both the same way). Unlike
    `accelerator.backward`, it never steps the engine: `deepspeed_optimizer_step` does, after the loop's
    non-finite check."""
    if not uses_deepspeed(accelerator):
        accelerator.backward(loss)
        return
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine.set_gradient_accumulation_boundary(is_boundary=last_micro)
    engine.backward(loss, scale_wrt_gas=False)


def deepspeed_optimizer_step(accelerator, finite) -> tuple[Any, str | None]:
    """The DeepSpeed engine's step (gradient clipping at `gradient_clipping`, the optimizer), taken only when
    every loss term and, under ZeRO-3, every process's part of the gradient is finite. Returns the gradient norm
    DeepSpeed measured before clipping and what was not finite (None when the engine stepped).

    Without ZeRO-3 only the losses are checked before the step (the gradient's norm after it); with fp16 DeepSpeed's
    loss scaler skips steps whose gradient overflowed, so its gradient is not checked here."""
    from hypo.runtime.distributed import any_process
    from hypo.training.stopping import non_finite_part

    engine = accelerator.deepspeed_engine_wrapped.engine
    check_gradient = engine.zero_optimization_stage() == 3 and not engine.fp16_enabled()
    bad_gradient = check_gradient and any_process(accelerator, not math.isfinite(local_gradient_square_norm(engine)))
    problem = non_finite_part(accelerator, finite, float("nan") if bad_gradient else 0.0)
    if problem is not None:
        return float("nan"), problem
    engine.step()
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None and not math.isfinite(float(grad_norm)) and not engine.fp16_enabled():
        return grad_norm, "the gradient norm"
    return grad_norm, None


def local_gradient_square_norm(engine) -> float:
    """The sum of squares of this process's part of the accumulated ZeRO-3 gradient (DeepSpeed's public
    `safe_get_local_grad`); non-finite when any of its entries is. Every process computes its own:
    `non_finite_part` lets them agree."""
    import torch
    from deepspeed.utils import safe_get_local_grad

    total = torch.zeros((), dtype=torch.float64)
    for parameter in engine.module.parameters():
        if parameter.requires_grad:
            grad = safe_get_local_grad(parameter)
            if grad is not None:
                total += grad.detach().double().pow(2).sum().cpu()
    return float(total)


def gradient_sync(accelerator, model, sync: bool):
    """Under data parallelism, gradients are all-reduced only in the backward passes run with sync=True
    (the last of an optimizer step); elsewhere this is a no-op.

    Under FSDP2 every backward reduce-scatters: skipping it would keep each micro-step's gradients unsharded on
    every GPU until the last one (16 GB in bf16 for an 8B model, beside the 4 GB shard), for one reduce-scatter
    less per micro-step. The sums are the same (docs/design.md: precision and sharding)."""
    if sync or getattr(accelerator, "is_fsdp2", False):
        return nullcontext()
    return accelerator.no_sync(model)
