"""A LoRA (peft) model's weights with its adapters merged in, made one tensor at a time: for the vLLM engine's
weight pushes (`hypo.sampling.vllm.weights`) and the merged model each save writes (`hypo.training.checkpoints`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def merged_lora_tensors(peft_model, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a LoRA (peft) model with its active adapters merged in, under the base model's names, one
    tensor at a time: an adapted weight becomes W + scale * B @ A (peft's `get_delta_weight`), added in float32,
    then cast to `dtype` and placed on `device` (default: each weight's own dtype and device). Only the tensor
    being made is new (plus one adapter delta): the consumer that drops each tensor before taking the next (an
    engine loading weights, a file writer) never holds more than one merged weight, where a whole merged copy
    of an 8B model would take 28 GB in float32. The model (and so the reference, its base) is not touched.
    modules_to_save take their trained copy. DoRA is refused (its merge also rescales by a magnitude vector).
    Tied weights are yielded under each name, as the same tensor when nothing had to be made.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    adapted: dict[str, tuple[str, LoraLayer]] = {}  # merged name -> (module name, module)
    for module_name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not getattr(module, "disable_adapters", False):
            adapted[f"{module_name}.weight"] = (module_name, module)
    made: dict[tuple, torch.Tensor] = {}  # tied names: the tensor made for the first name
    for name, tensor in base.state_dict().items():
        parts = name.split(".")
        if any(part in LORA_PARTS for part in parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:  # X.modules_to_save.<adapter>.weight -> X.weight
            at = parts.index("modules_to_save")
            parts = parts[:at] + parts[at + 2:]
        name = ".".join(part for part in parts if part != "base_layer")
        tensor = tensor.detach()
        target_dtype, target_device = dtype or tensor.dtype, device or tensor.device
        if name in adapted:
            module_name, module = adapted[name]
            merged = tensor.to(device=target_device, dtype=torch.float32, copy=True)
            for adapter in module.active_adapters:
                if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                    continue
                if module.use_dora.get(adapter, False):
                    raise ValueError(f"{module_name}: DoRA adapters cannot be pushed to vLLM as merged weights here")
                merged += module.get_delta_weight(adapter).to(device=target_device, dtype=torch.float32)
            yield name, merged.to(target_dtype)
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) \
            if tensor.device.type != "meta" else None
        if key is not None and key in made:
            yield name, made[key]
            continue
        out = tensor.to(device=target_device, dtype=target_dtype)
        if out is not tensor and key is not None:
            made[key] = out
        yield name, out
