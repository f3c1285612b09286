"""One metrics logger for every sink: a JSONL file always, plus accelerate's trackers when asked."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class RunLogger:
    """`log(metrics, step)` writes a JSON line to `metrics.jsonl` (main process only) and forwards the
    same dictionary to the trackers named in `report_to` (tensorboard, wandb, trackio) through accelerate.
    Without an accelerator (one process, e.g. a run driven by another trainer) it writes the file only."""

    def __init__(self, output_dir: str | Path, accelerator=None, report_to: list[str] | None = None,
                 config: dict[str, Any] | None = None, resume_after: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.is_main_process = accelerator is None or accelerator.is_main_process
        if self.is_main_process:
            kept = []
            if resume_after is not None and self.path.is_file():  # a resumed run continues the file
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= resume_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.trackers = bool(report_to) and accelerator is not None
        if self.trackers:
            accelerator.init_trackers("hypo", config={k: v for k, v in (config or {}).items() if v is not None})
        self.listeners: list = []  # called with (metrics, step) after each record (the trainer's on_log)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main_process:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.trackers:
            self.accelerator.log(metrics, step=step)
        for listener in self.listeners:
            listener({k: v for k, v in record.items() if k != "step"}, step)

    def close(self) -> None:
        """Finish the trackers (not `accelerator.end_training()`, which also destroys the process group that a
        later run in the same process would reuse)."""
        if self.trackers:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self.trackers = False


def _plain(value: Any) -> Any:
    """A JSON value: tensors become numbers; NaN and infinities (not JSON) become null."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def cuda_synchronize() -> None:
    """Wait until the GPU has run the work queued so far (a no-op without CUDA). CUDA kernels run asynchronously:
    a clock read without it measures how long launching took, not the work."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer:
    """Wall-clock seconds spent in named phases of one step (generation, reference, ...). Every clock read first
    waits for the device (`synchronize`, by default `cuda_synchronize`), so a phase is charged with its own GPU
    work, not the next phase's."""

    def __init__(self, synchronize: Callable[[], None] | None = cuda_synchronize) -> None:
        self.seconds: dict[str, float] = {}
        self.synchronize = synchronize

    def now(self) -> float:
        """The clock, once the device has finished the work queued so far."""
        if self.synchronize is not None:
            self.synchronize()
        return time.perf_counter()

    def reset(self) -> StepTimer:
        """Start a new step: forget the phases of the last one."""
        self.seconds = {}
        return self

    @contextmanager
    def __call__(self, name: str):
        start = self.now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.now() - start
