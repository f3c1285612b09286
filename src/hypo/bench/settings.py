"""What one `hypo bench` run measures: the workload (a `HyPOConfig`) and the bench's own settings."""

from __future__ import annotations

import json
import resource
import statistics
from dataclasses import asdict, dataclass, field

from hypo.config import HyPOConfig

RESULT_PREFIX = "BENCH_RESULT "
"""The line a variant's process prints its JSON result on."""


def _workload() -> HyPOConfig:
    return HyPOConfig(eval_at_end=False)


@dataclass
class BenchSettings:
    """The benchmark's own options. The workload is a `HyPOConfig` (default: the default training run's
    shape, 4 pairs + 4 prompts x 2 samples of up to 64 tokens per step, on the embedded SmolLM2-135M-Instruct
    and the bundled task); every variant, ours and TRL's, trains under it."""

    config: HyPOConfig = field(default_factory=_workload)
    warmup_steps: int = 2
    measured_steps: int = 5
    fewer_prompts: tuple[int, ...] = (2, 1)
    trl: bool = True
    weights_changed: bool = False
    vllm: bool = False

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.measured_steps

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchSettings:
        raw = json.loads(text)
        return cls(config=HyPOConfig(**raw.pop("config")), fewer_prompts=tuple(raw.pop("fewer_prompts")), **raw)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def median_after_warmup(values: list[float], warmup: int) -> float:
    kept = values[warmup:] or values
    return statistics.median(kept)


