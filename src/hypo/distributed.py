"""Sharded training (FSDP2, DeepSpeed ZeRO-3): the operations every process must join.

Under sharding each process holds a slice of the weights, so three things that are local elsewhere become
collective: writing the model (the full weights are gathered to the main process), generating (the
weights are gathered once for the whole `generate` call instead of once per decoding step and layer),
and checking the weights. Without sharding these functions do the plain local thing, so the loop calls
them unconditionally.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 (`fully_shard`) modules inside `model`, outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_zero3(model: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3 partitions parameters (they carry a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model)) or is_zero3(model)


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the main process (other processes get an empty or partial dict).
    Collective under sharding: every process must call it."""
    if fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_zero3(model):
        return accelerator.get_state_dict(model)
    return accelerator.unwrap_model(model).state_dict()


@contextmanager
def gathered_for_generation(model: torch.nn.Module):
    """The full weights on every process for the duration (collective under sharding): FSDP2 modules are
    unsharded once and kept so across forwards, ZeRO-3 parameters are gathered (TRL gathers the same way
    for generation). Generation then runs locally, so processes may stop at different lengths."""
    modules = fsdp_modules(model)
    if modules:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield model
        finally:
            for module in modules:
                module.reshard()
                module.set_reshard_after_forward(True, recurse=False)
        return
    if is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield model
        return
    yield model


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded, DTensor) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_finite(accelerator, parameters) -> bool:
    """Whether every weight is finite on every process (each checks its own shard)."""
    finite = torch.tensor(float(all(torch.isfinite(local_tensor(p)).all() for p in parameters)),
                          device=accelerator.device)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, "sum") / accelerator.num_processes
    return bool(finite == 1)
