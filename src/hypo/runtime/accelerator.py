"""The accelerate set-up of a run: devices, processes, precision and trackers, and determinism in one place."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hypo.runtime.precision import forget_other_precision, resolve_mixed_precision


def make_accelerator(*, mixed_precision: str, trackers: list[str], project_dir: Path, timeout_seconds: int = 1800):
    """An `accelerate.Accelerator` for this process: `mixed_precision` resolved (`auto` follows the device),
    gloo data parallelism when several processes share a machine without a GPU, `trackers` for the metrics.

    `timeout_seconds`: how long a process waits in a collective (the other processes wait while the main one
    evaluates alone; NCCL's own default is 10 minutes). Data parallelism keeps the gradients as views of its
    all-reduce buckets (`gradient_as_bucket_view`), not beside them: one copy of the gradients instead of two."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    precision = resolve_mixed_precision(mixed_precision)
    forget_other_precision(precision)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_seconds), backend=process_group_backend()),
                DistributedDataParallelKwargs(gradient_as_bucket_view=True)]
    accelerator = Accelerator(log_with=trackers or None, project_dir=str(project_dir), cpu=multi_process_cpu(),
                              mixed_precision=precision, kwargs_handlers=handlers)
    if accelerator.num_processes > 1:
        close_process_groups_at_exit()
    return accelerator


def launched_num_processes() -> int:
    """How many processes the launcher started (torchrun and `accelerate launch` set WORLD_SIZE), known before
    the accelerator is made."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def uses_deepspeed_launcher() -> bool:
    """`accelerate launch` with a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED for every process)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_backend() -> str | None:
    """The process group's backend when accelerate's own choice is wrong, else None (accelerate's). DeepSpeed on
    several processes without a GPU (DeepSpeed's CPU accelerator): accelerate needs gloo named, otherwise it
    counts one process of rank 0 in each (every process then writes as the main one and averages are sums)."""
    if uses_deepspeed_launcher() and not torch.cuda.is_available() and launched_num_processes() > 1:
        return "gloo"
    return None


def multi_process_cpu() -> bool:
    """Several processes without a GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU
    host): accelerate then needs cpu=True to set up gloo data parallelism. Not under DeepSpeed, which accelerate
    drops with cpu=True: DeepSpeed's CPU accelerator sets up its own (gloo) process group."""
    return not torch.cuda.is_available() and launched_num_processes() > 1 and not uses_deepspeed_launcher()


def seed_everything(seed: int) -> None:
    """Determinism in one place: Python, NumPy and torch seeds (dropout is disabled at load time,
    the reference is frozen in eval mode)."""
    from accelerate.utils import set_seed

    set_seed(seed)


def close_process_groups(*, after_error: bool = False) -> None:
    """Destroy every process group (the default one and those of device meshes, e.g. FSDP2's) and forget
    accelerate's process state, then collect what held them, while the interpreter is fully alive.

    Left to the interpreter's exit, a group's worker threads may still hold work objects whose tensors need the
    Python runtime that is being torn down: the process then aborts (SIGABRT, "terminate called without an
    active exception") after all its outputs were written. A later `Accelerator` starts afresh. After an error
    that one process may have met alone, the others may wait inside a collective: there only gloo groups are
    destroyed (destroying an NCCL communicator can block; the launcher ends the processes)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if after_error and dist.get_backend() != "gloo":
            return
        dist.destroy_process_group()  # no argument: every group, the device meshes' included
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()  # the groups held by sharded modules no longer referenced are released now, not at exit


_close_at_exit_registered = False


def close_process_groups_at_exit() -> None:
    """Close the process groups when the interpreter exits (before it tears itself down), once per process: a
    Python user may call `hypo.train` several times in one process under torchrun, each reusing the group."""
    global _close_at_exit_registered
    if not _close_at_exit_registered:
        import atexit

        atexit.register(close_process_groups)
        _close_at_exit_registered = True
