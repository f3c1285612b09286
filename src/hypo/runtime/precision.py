"""Compute precision: what `mixed_precision` means on this machine, and accelerate's one process-wide choice.

The weights and the optimizer stay float32; bf16 / fp16 enter through autocast (docs/design.md: precision and
sharding). Every entry point that trains (`hypo train`, `hypo sft`, the TRL baselines of `hypo bench` and the
labs) resolves `auto` here, so they all mean the same thing by it.
"""

from __future__ import annotations

import torch


def resolve_mixed_precision(mixed_precision: str) -> str:
    """`auto`: bf16 autocast on a GPU that supports it, none on CPUs (bf16 matmuls are slower there).
    fp16 needs a GPU: its loss scaling is CUDA's.

    Example: "auto" -> "no" on a CPU, "bf16" on an H100; "fp16" on a CPU -> ValueError.
    """
    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("mixed_precision=fp16 needs a CUDA GPU (loss scaling); on CPUs use bf16 or no")
    return mixed_precision


def forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another precision; a
    new run in the same Python process (two `hypo.train` calls) replaces it. The distributed set-up is kept."""
    from accelerate.state import AcceleratorState

    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
