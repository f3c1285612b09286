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
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_seconds)),
                DistributedDataParallelKwargs(gradient_as_bucket_view=True)]
    return Accelerator(log_with=trackers or None, project_dir=str(project_dir), cpu=multi_process_cpu(),
                       mixed_precision=precision, kwargs_handlers=handlers)


def multi_process_cpu() -> bool:
    """Several processes without a GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU
    host): accelerate then needs cpu=True to set up gloo data parallelism."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def seed_everything(seed: int) -> None:
    """Determinism in one place: Python, NumPy and torch seeds (dropout is disabled at load time,
    the reference is frozen in eval mode)."""
    from accelerate.utils import set_seed

    set_seed(seed)
