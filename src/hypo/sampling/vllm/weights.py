"""The policy's weights for a vLLM engine: merged LoRA, tied layers, the safetensors file a server reloads,
and the push after each optimizer step (samples of step t + 1 come from the policy after step t).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass
class WeightPush:
    """One transfer of the policy's weights into the engine."""

    tensors: int
    bytes: int
    write_seconds: float  # state dict -> safetensors file (0 in colocate mode)
    load_seconds: float  # the engine loads them (and drops its prefix cache)

    @property
    def seconds(self) -> float:
        return self.write_seconds + self.load_seconds


def merged_lora_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The weights of a LoRA (peft) model with its active adapters merged in, under the base model's names,
    computed out of place: the model itself (and so the reference, its base) is not touched.

    Each adapted weight becomes W + scale * B @ A (peft's `get_delta_weight`); modules_to_save take their
    trained copy. DoRA is refused (its merge also rescales by a magnitude vector).
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    modules = dict(base.named_modules())
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        parts = name.split(".")
        if any(part in LORA_PARTS for part in parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:  # X.modules_to_save.<adapter>.weight -> X.weight
            at = parts.index("modules_to_save")
            parts = parts[:at] + parts[at + 2:]
        merged[".".join(part for part in parts if part != "base_layer")] = tensor.detach()
    for module_name, module in modules.items():
        if not isinstance(module, LoraLayer) or getattr(module, "disable_adapters", False):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if module.use_dora.get(adapter, False):
                raise ValueError(f"{module_name}: DoRA adapters cannot be pushed to vLLM as merged weights here")
            key = f"{module_name}.weight"
            merged[key] = merged[key] + module.get_delta_weight(adapter).to(merged[key].dtype)
    return merged


def vllm_state_dict(model_or_state_dict) -> dict[str, torch.Tensor]:
    """What the engine loads: a state dict as given (e.g. the full weights gathered under sharding), or a
    model's (LoRA merged, see `merged_lora_state_dict`), under Hugging Face names.

    Tied weights are written under every name, the output layer included: vLLM's CPU backend keeps its own
    packed copy of a tied output layer, and a reload that carries only the embedding leaves that copy stale
    (measured with SmolLM2-135M: per-token log-probs 0.5 nats off the updated policy without
    `lm_head.weight` in the file, 4e-5 with it). Where the two share memory the engine loads it twice.
    """
    if isinstance(model_or_state_dict, dict):
        state_dict = model_or_state_dict
    elif hasattr(model_or_state_dict, "get_base_model") and hasattr(model_or_state_dict, "peft_config"):
        state_dict = merged_lora_state_dict(model_or_state_dict)
    else:
        state_dict = model_or_state_dict.state_dict()
    out, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) \
            if tensor.device.type != "meta" else None
        out[name] = tensor.clone() if key in seen else tensor  # safetensors refuses tensors that share memory
        seen.add(key)
    return out


def write_weights(state_dict: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Write `folder/model.safetensors` whole or not at all (a partial file, renamed into place), on the CPU,
    floating tensors cast to `dtype` if given. Returns (tensors, bytes)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.to("cpu").contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{WEIGHTS_FILE}.partial-{os.getpid()}"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / WEIGHTS_FILE)
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def default_weights_dir() -> Path:
    """A new folder for pushed weights: in /dev/shm (memory) when it exists, else the system temp folder."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="hypo-vllm-weights-", dir=root))


def push_policy(accelerator, policy, sampler) -> WeightPush | None:
    """Put the policy's current weights into the vLLM engine; every process calls it (before the first step
    and after each optimizer step), and all wait until the push is done. Returns the push on the processes
    that made one.

    Server mode: the main process pushes (under FSDP2 / ZeRO-3 the full weights are gathered to it first, a
    collective). Colocate mode: each process loads its own engine (unsharded policies only: under sharding
    only the main process holds the full weights, so use server mode there). LoRA policies push merged
    weights (unsharded only).
    """
    from hypo.runtime.distributed import full_state_dict, is_sharded

    model = accelerator.unwrap_model(policy)
    sharded = is_sharded(model)
    if sharded and hasattr(model, "peft_config"):
        raise NotImplementedError("vLLM weight pushes of a LoRA policy under FSDP2 / ZeRO-3 (merged weights of a "
                                  "sharded adapter) are not supported; train LoRA unsharded")
    if sharded and not sampler.pushes_from_main_process:
        raise NotImplementedError("vllm_mode colocate with a sharded policy: only the main process gathers the "
                                  "full weights; use vllm_mode server")
    weights = full_state_dict(accelerator, policy) if sharded else model  # collective when sharded
    push = None
    if accelerator.is_main_process or not sampler.pushes_from_main_process:
        push = sampler.push_weights(weights)
    accelerator.wait_for_everyone()  # no process samples before the engine holds the new weights
    return push


