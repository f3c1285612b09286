"""A `Launch` from an accelerate config file (`accelerate launch --config_file`) or from flags."""

from __future__ import annotations

import json
from pathlib import Path

from hypo.planning.memory import Launch


def launch_from_accelerate_config(path: str | Path, *, gpu_memory_gb: float = 80.0) -> Launch:
    """The GPUs and the sharding an accelerate config file asks for: one process (NO), data parallelism
    (MULTI_GPU), FSDP2 (FSDP with fsdp_version 2; version 1 is refused, as `hypo train` refuses it), DeepSpeed
    (stage 3: ZeRO-3; stages 1 and 2 keep whole weights on each GPU: planned as data parallel). A relative
    DeepSpeed config path is read from the current folder, as accelerate reads it."""
    from accelerate import DistributedType
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"accelerate config not found: {path}")
    try:
        config = load_config_from_file(str(path))
    except Exception as error:  # accelerate raises assorted errors for a bad file
        raise ValueError(f"{path}: not an accelerate config ({type(error).__name__}: {error})") from None
    processes = int(config.num_processes or 1)
    kind = config.distributed_type
    if kind == DistributedType.NO:
        sharding = "none"
    elif kind == DistributedType.MULTI_GPU:
        sharding = "ddp"
    elif kind == DistributedType.FSDP:
        if int((config.fsdp_config or {}).get("fsdp_version", 1)) != 2:
            raise ValueError(f"{path}: hypo shards with FSDP2 only (fsdp_version: 2)")
        sharding = "fsdp2"
    elif kind == DistributedType.DEEPSPEED:
        sharding = "zero3" if deepspeed_stage(config.deepspeed_config or {}, path) == 3 else "ddp"
    else:
        raise ValueError(f"{path}: distributed_type {kind} is not a GPU launch hypo plans for")
    return Launch(num_gpus=processes, gpu_memory_gb=gpu_memory_gb, sharding=sharding, source=str(path))


def deepspeed_stage(deepspeed_config: dict, source: Path) -> int:
    """The ZeRO stage of an accelerate config's DeepSpeed section: its own `zero_stage`, or the stage in the
    DeepSpeed JSON file it names."""
    if "zero_stage" in deepspeed_config:
        return int(deepspeed_config["zero_stage"])
    file = deepspeed_config.get("deepspeed_config_file")
    if not file:
        raise ValueError(f"{source}: a DeepSpeed launch needs zero_stage or deepspeed_config_file")
    try:
        data = json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: deepspeed_config_file {file} not found (relative paths are read from "
                                "the folder you launch in: the repository root for the recipes)") from None
    return int(data.get("zero_optimization", {}).get("stage", 0))
