"""Why a run stops early, and how: a stop signal (save, then exit 130 / 143), or a non-finite loss, gradient
or weight (no optimizer step on it, no final model)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after an optimizer step; a checkpoint to resume from was saved."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path):
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint
        super().__init__(f"stopped by signal {signal_number} after step {step}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number  # 130 for SIGINT, 143 for SIGTERM


class NonFiniteError(RuntimeError):
    """A loss term or the gradient was not finite: the optimizer did not step on it."""

    def __init__(self, step: int, problem: str, last_checkpoint: Path | None):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
            "no checkpoint was saved (--save_steps N saves them)"
        super().__init__(f"step {step}: {problem} is not finite (NaN or inf); the optimizer did not step on it and "
                         f"no final model was saved; {where}. A lower learning_rate or kl_coef, or gradient clipping "
                         "(max_grad_norm), usually helps.")


class StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current optimizer step (and save); a second SIGINT
    exits at once. Handlers are installed only in the main thread, and restored by `restore`."""

    def __init__(self) -> None:
        import signal
        import threading

        self.signal: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        import os
        import signal
        import sys

        if self.signal is not None and number == signal.SIGINT:  # a second Ctrl-C
            os._exit(130)
        self.signal = number
        print(f"\nhypo: signal {number}: stopping after this optimizer step (saving a checkpoint); "
              "press Ctrl-C again to exit at once", file=sys.stderr, flush=True)

    def received(self, accelerator) -> bool:
        """Whether any process received a stop signal (all processes agree on the step they stop at)."""
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "sum")
            if flag > 0 and self.signal is None:
                import signal

                self.signal = signal.SIGTERM
        return bool(flag > 0)

    def restore(self) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def non_finite_part(accelerator, finite: torch.Tensor, grad_norm) -> str | None:
    """Which term (dpo, kl) or the gradient norm is not finite on any process; None when all are finite."""
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, "sum") == accelerator.num_processes
    if not finite[0]:
        return "the offline (dpo) loss"
    if not finite[1]:
        return "the online (kl) loss"
    if not math.isfinite(float(grad_norm)):
        return "the gradient norm"
    return None


def last_checkpoint(output_dir: Path) -> Path | None:
    from hypo.training.checkpoints import list_checkpoints

    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def check_finite_weights(accelerator, model, step: int, output_dir: Path) -> None:
    """Never save a non-finite model as final (each process checks its shard; all agree)."""
    from hypo.runtime.distributed import all_finite

    if not all_finite(accelerator, model.parameters()):
        raise NonFiniteError(step, "a weight", last_checkpoint(output_dir))


