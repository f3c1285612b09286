"""The policy's weights for a vLLM engine: merged LoRA, tied layers, the safetensors file a server reloads,
and the push after each optimizer step (samples of step t + 1 come from the policy after step t).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hypo.models.merging import merged_lora_tensors

WEIGHTS_FILE = "model.safetensors"


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


def merged_lora_state_dict(peft_model, **kwargs) -> dict[str, torch.Tensor]:
    """`merged_lora_tensors` as one dict (every merged weight at once: for small models and tests)."""
    return dict(merged_lora_tensors(peft_model, **kwargs))


def vllm_weights(model_or_state_dict, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """What the engine loads, one tensor at a time, under Hugging Face names: a state dict as given (e.g. the full
    weights gathered under sharding), or a model's (LoRA merged tensor by tensor, see `merged_lora_tensors`),
    floating tensors in `dtype` when given (the engine's: each is cast as it is handed over).

    Tied weights come under every name, the output layer included: vLLM's CPU backend keeps its own packed copy
    of a tied output layer, and a reload that carries only the embedding leaves that copy stale (measured with
    SmolLM2-135M: per-token log-probs 0.5 nats off the updated policy without `lm_head.weight` in the file, 4e-5
    with it).
    """
    if isinstance(model_or_state_dict, dict):
        items = model_or_state_dict.items()
    elif hasattr(model_or_state_dict, "get_base_model") and hasattr(model_or_state_dict, "peft_config"):
        items = merged_lora_tensors(model_or_state_dict, dtype=dtype)
    else:
        items = model_or_state_dict.state_dict().items()
    for name, tensor in items:
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor


def vllm_state_dict(model_or_state_dict) -> dict[str, torch.Tensor]:
    """`vllm_weights` as one dict, tensors that share memory cloned (safetensors refuses shared tensors)."""
    return unshared(vllm_weights(model_or_state_dict))


def unshared(items) -> dict[str, torch.Tensor]:
    """A dict of (name, tensor) pairs in which no two tensors share memory: a repeated one is cloned."""
    out, seen = {}, set()
    for name, tensor in items:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) \
            if tensor.device.type != "meta" else None
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def write_weights(state_dict, folder: Path, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Write `folder/model.safetensors` (from a dict or (name, tensor) pairs, e.g. `vllm_weights`) whole or not at
    all (a partial file, renamed into place), on the CPU, floating tensors cast to `dtype` if given, each cast on
    its own device before it moves. The previous file is deleted first (the engine has loaded it), so the folder
    never holds two: 16 GB at a time for an 8B model in bf16, not 32. A folder without room (Docker's /dev/shm is
    64 MB unless `--shm-size` says otherwise) raises a ValueError before anything is written. Returns (tensors,
    bytes)."""
    from safetensors.torch import save_file

    items = state_dict.items() if isinstance(state_dict, dict) else state_dict
    tensors = unshared((name, _to_cpu(tensor, dtype)) for name, tensor in items)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    check_room(folder, size)
    partial = folder / f".{WEIGHTS_FILE}.partial-{os.getpid()}"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / WEIGHTS_FILE)
    return len(tensors), size


def _to_cpu(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to("cpu").contiguous()


SAFETENSORS_MARGIN = 1 << 20
"""Room for the file's header beside the tensors."""


def check_room(folder: Path, size: int) -> None:
    """Refuse to write `size` bytes of weights into a folder whose filesystem has less free space."""
    free = shutil.disk_usage(folder).free
    if free < size + SAFETENSORS_MARGIN:
        raise ValueError(
            f"vLLM weight push: {folder} has {free / 1e9:.2f} GB free, the policy's weights take {size / 1e9:.2f} GB "
            "(one file, rewritten after every step). In Docker, /dev/shm is 64 MB unless the container is started "
            "with --shm-size (or --ipc=host); or set vllm_server_weights_dir to a folder with room that the server "
            "reads under the same path")


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
    weights = full_state_dict(accelerator, policy) if sharded else model  # collective when sharded; LoRA merged
    # tensor by tensor on the way
    push = None
    if accelerator.is_main_process or not sampler.pushes_from_main_process:
        push = sampler.push_weights(weights)
    accelerator.wait_for_everyone()  # no process samples before the engine holds the new weights
    return push


