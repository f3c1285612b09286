"""The frozen reference pi_ref: a separate model, or the LoRA policy's base with its adapters disabled."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Reference model: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


class Reference:
    """The frozen reference pi_ref: a separate model, or the LoRA policy's base with adapters disabled
    (no second copy of the weights)."""

    def __init__(self, model: torch.nn.Module | None = None, peft_policy=None):
        if (model is None) == (peft_policy is None):
            raise ValueError("give exactly one of a reference model or a LoRA policy")
        self.model = freeze(model) if model is not None else None
        self.peft_policy = peft_policy

    @contextmanager
    def active(self):
        """Yield a module whose outputs are the reference's."""
        if self.model is not None:
            yield self.model
            return
        with self.peft_policy.disable_adapter():
            yield self.peft_policy

    def to(self, device) -> Reference:
        if self.model is not None:
            self.model.to(device)
        return self

    def prepare(self, accelerator) -> Reference:
        """Place the reference as the policy is placed, never wrapped for training (no DDP, no optimizer):
        - FSDP2: sharded like the policy (`hypo.runtime.distributed.shard_frozen_fsdp2`): 1/N of its weights per
          process, its forward in the plugin's mixed precision. accelerate's `prepare_model(evaluation_mode=True)`
          would neither shard it nor (under FSDP) move it to the GPU;
        - DeepSpeed ZeRO-3: partitioned like the policy by an engine without optimizer
          (`hypo.runtime.distributed.shard_frozen_zero3`, TRL's way);
        - otherwise: on the accelerator's device, its forward under the accelerator's autocast like the policy's.
        Sharded, every forward of the reference is collective. A LoRA reference is the prepared policy itself.
        """
        if self.model is None:
            return self
        from hypo.runtime.distributed import refuse_fsdp1, shard_frozen_fsdp2, shard_frozen_zero3, uses_zero3

        refuse_fsdp1(accelerator)
        if accelerator.is_fsdp2:
            self.model = shard_frozen_fsdp2(accelerator, self.model)
        elif uses_zero3(accelerator):
            self.model = shard_frozen_zero3(accelerator, self.model)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)
        return self

    @contextmanager
    def gathered(self):
        """The reference's full weights on every process for the duration (collective when it is sharded), so
        that one process alone may run it (evaluation, sampling the reference). A LoRA reference is the policy:
        gathering the policy gathers it."""
        from hypo.runtime.distributed import gathered_for_generation

        if self.model is None:
            yield self
            return
        with gathered_for_generation(self.model):
            yield self


