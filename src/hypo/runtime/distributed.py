"""Sharded training (FSDP2, DeepSpeed ZeRO-3): the operations every process must join.

Under sharding each process holds a slice of the weights, so things that are local elsewhere become
collective: writing the model (the full weights are gathered to the main process), generating (the
weights are gathered once for the whole `generate` call instead of once per decoding step and layer),
checking the weights, and every forward pass (each layer's weights are all-gathered as it runs). The frozen
reference is sharded like the policy (`shard_frozen_fsdp2`, `shard_frozen_zero3`), so its forwards are
collective too: every process must run them the same number of times (`any_process` keeps the reference
log-prob cache in lock-step). Without sharding these functions do the plain local thing, so the loop calls
them unconditionally.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

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
def gathered_for_generation(model: torch.nn.Module, engine: Any = None):
    """The full weights on every process for the duration (collective under sharding): FSDP2 modules are
    unsharded once and kept so across forwards; ZeRO-3 parameters are gathered and, with `engine` (the DeepSpeed
    engine that partitions `model`, or `model` itself when it is one), DeepSpeed's parameter hooks are removed
    meanwhile (`zero3_hooks_removed`, TRL's way), so no forward re-partitions or re-gathers a weight. Generation
    then runs locally, so processes may stop at different lengths."""
    modules = fsdp_modules(model)
    if modules:
        settings = [_reshard_setting(module) for module in modules]
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield model
        finally:
            for module, setting in zip(modules, settings, strict=True):
                module.reshard()
                _restore_reshard_setting(module, setting)
        return
    if is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())), zero3_hooks_removed(engine or model):
            yield model
        return
    yield model


def zero3_parameter_offload(engine: Any):
    """The object that holds a ZeRO-3 engine's parameter hooks: its optimizer's `parameter_offload`, or (an engine
    without optimizer, such as the reference's) the `DeepSpeedZeRoOffload` DeepSpeed keeps as its optimizer;
    None for anything else."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if hasattr(offload, "forward_hooks") and hasattr(offload, "module") else None


@contextmanager
def zero3_hooks_removed(engine: Any):
    """Without DeepSpeed's ZeRO-3 forward and backward hooks for the duration (the weights being gathered):
    with them each forward of a generation would release (re-partition) the gathered weights and the next one
    gather them again, a collective per decoding step that hangs when processes stop at different lengths.
    The hooks are registered again afterwards, with the parameter coordinator's recorded trace invalidated (its
    prefetch order no longer matches). TRL's `remove_hooks` / `add_hooks` do the same, except for the root's
    start-of-forward hook, which TRL keeps (all its processes generate together). Nothing to do for anything but
    a ZeRO-3 engine."""
    offload = zero3_parameter_offload(engine)
    if offload is None:
        yield
        return
    for parameter in offload.module.parameters():
        parameter.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    # the root's start-of-forward hook checks that every process is at the same step (a collective): with it a
    # process that generates alone (the main process evaluating) waits for the others forever
    start_of_forward = offload.module._forward_pre_hooks.get(offload.fwd_pre_hook.id)
    offload.fwd_pre_hook.remove()
    try:
        yield
    finally:
        if start_of_forward is not None:
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_of_forward, prepend=True)
        coordinator = getattr(offload, "param_coordinator", None)
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        offload._register_deepspeed_module(offload.module)


def _reshard_setting(module) -> tuple | None:
    """An FSDP2 module's reshard-after-forward setting as torch keeps it (the root's is chosen automatically,
    False: its weights stay gathered from forward to backward); None where torch's private state differs."""
    try:
        state = module._get_fsdp_state()
        return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]
    except AttributeError:
        return None


def _restore_reshard_setting(module, setting: tuple | None) -> None:
    """Put back what `_reshard_setting` read (or reshard after forward, the public default, without it)."""
    if setting is None:
        module.set_reshard_after_forward(True, recurse=False)
        return
    state = module._get_fsdp_state()
    state._auto_reshard_after_forward = setting[0]
    for group, mesh_info in zip(state._fsdp_param_groups, setting[1], strict=True):
        group.post_forward_mesh_info = mesh_info


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


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is True on any process (an all-reduce when there are several: every process must call
    it); the local `flag` otherwise."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
    return bool(count > 0)


# --------------------------------------------------------------------------- the frozen reference


def shard_frozen_fsdp2(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model (the reference) across processes as accelerate's FSDP2 plugin shards the policy:
    the same `fsdp2_prepare_model` (one group per decoder layer, the embeddings and head, then the root; the
    plugin's mesh, mixed precision and CPU offload; with `cpu_ram_efficient_loading` the main process's
    weights broadcast to the others, whose copies transformers left empty). Every group then reshards after
    its forward: a frozen model has no backward that weights kept gathered would serve, so between forwards
    each process holds 1/N of it. Collective: every process must call it, and then run each of its forwards.
    """
    from accelerate.utils import fsdp2_prepare_model

    model.requires_grad_(False)
    model = fsdp2_prepare_model(accelerator, model)
    for module in fsdp_modules(model):
        module.set_reshard_after_forward(True, recurse=False)
    return model.eval()


def zero3_inference_config(train_config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """A DeepSpeed config for a frozen ZeRO-3 model, from the run's (training) config: the same ZeRO-3
    partitioning and precision, without the optimizer, scheduler and optimizer offload (no optimizer is
    given), and with bucket sizes from the hidden size as transformers and TRL choose them for inference.

    Example: hidden_size 4096 -> stage3_prefetch_bucket_size 0.9 * 4096**2, param_persistence 40960.
    """
    config = copy.deepcopy(train_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"zero3_inference_config needs a ZeRO stage 3 config, got stage {zero.get('stage')}")
    zero.pop("offload_optimizer", None)
    if hidden_size:
        zero.update({"reduce_bucket_size": hidden_size * hidden_size,
                     "stage3_param_persistence_threshold": 10 * hidden_size,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size)})
    return config


def refuse_fsdp1(accelerator) -> None:
    """hypo shards the frozen reference with FSDP2 (`shard_frozen_fsdp2`); FSDP version 1 is refused, before any
    model loads (`hypo.training.setup.prepare_run`) and again where the reference is placed."""
    from accelerate import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("hypo shards the reference with FSDP2 only: launch with --fsdp_version 2 "
                         "(fsdp_version: 2 in the accelerate config)")


def uses_zero3(accelerator) -> bool:
    """Whether the run is DeepSpeed ZeRO stage 3 (parameters partitioned across processes)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def shard_frozen_zero3(accelerator, model: torch.nn.Module):
    """Partition a frozen model (the reference) with ZeRO-3 like the policy: a DeepSpeed engine with no
    optimizer (`zero3_inference_config`), in eval mode. Collective, like `shard_frozen_fsdp2`."""
    import deepspeed

    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    config = zero3_inference_config(accelerator.state.deepspeed_plugin.deepspeed_config, hidden_size)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike Module.eval
    return engine
