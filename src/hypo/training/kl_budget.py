"""A KL budget (`target_kl`, any method): the periodic held-out evaluation measures the reverse KL of the policy to
the reference; the first state beyond the budget stops the run, and the final model is the last evaluated state
within it.

The estimate is the evaluation's: k1 = log pi(y|x) - log pi_ref(y|x) on `eval_num_samples` temperature-1 samples of
each of the first `eval_max_prompts_during_training` held-out prompts, averaged per prompt, then across prompts,
with the standard error across prompts (docs/design.md: evaluation protocol). It is noisy: `target_kl_margin` adds
that many standard errors before comparing, so that "within" means within with some confidence. Each state found
within the budget is saved as a checkpoint when it is evaluated (the state is never re-trained), and the checkpoint
of the previous one is removed unless `save_steps` made it too. The initial model (step 0) is within any budget
when the reference is the initial policy (its KL is exactly 0); otherwise it is evaluated first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class KLBudget:
    """The budget and what it has seen: the state it keeps and, once the budget is passed, where and why."""

    target_kl: float
    margin: float = 0.0  # standard errors added to the estimate
    kept_step: int | None = None  # the last evaluated state within the budget (0: the initial model)
    kept_kl: float | None = None  # its estimate (None for an initial model that is the reference itself)
    kept_kl_se: float | None = None
    stop_step: int | None = None  # the first evaluated state beyond the budget
    stop_kl: float | None = None
    stop_kl_se: float | None = None

    def within(self, kl: float, se: float) -> bool:
        """Whether a state with KL estimate `kl` +- `se` is within the budget: kl + margin * se <= target_kl.

        Example: target_kl 0.5, margin 2: kl 0.40 +- 0.04 -> 0.48, within; kl 0.40 +- 0.06 -> 0.52, beyond;
        with margin 0 both are within (0.40 <= 0.5)."""
        return kl + self.margin * se <= self.target_kl

    def record(self, step: int, kl: float | None, se: float | None) -> bool:
        """Record the evaluation of the state after `step` (kl None: the reference itself, KL 0); True when it is
        within the budget (it becomes the kept state), False when it is beyond (the run stops)."""
        if kl is None or self.within(kl, se or 0.0):
            self.kept_step, self.kept_kl, self.kept_kl_se = step, kl, se
            return True
        self.stop_step, self.stop_kl, self.stop_kl_se = step, kl, se
        return False

    @property
    def exceeded(self) -> bool:
        return self.stop_step is not None

    def kept_checkpoint(self, output_dir: Path) -> Path:
        return Path(output_dir) / f"checkpoint-{self.kept_step}"

    def summary(self) -> str:
        """One sentence: which state the run kept, and why it stopped (or that it stayed within the budget)."""
        kept = "the initial model (step 0)" if self.kept_step == 0 else f"the state after step {self.kept_step}"
        if self.kept_kl is not None:
            kept += f" (held-out KL {_nats(self.kept_kl, self.kept_kl_se)})"
        rule = f"target_kl {self.target_kl:g}" + (f" with a margin of {self.margin:g} standard errors"
                                                  if self.margin else "")
        if not self.exceeded:
            return f"stayed within {rule}; the last evaluated state within it was {kept}"
        return (f"stopped at step {self.stop_step}: held-out KL {_nats(self.stop_kl, self.stop_kl_se)} is beyond "
                f"{rule}; the final model is {kept}")

    def metrics(self) -> dict[str, float]:
        """What metrics.jsonl records about the budget at the end of the run."""
        out = {"kl_budget/target_kl": self.target_kl, "kl_budget/kept_step": float(self.kept_step or 0),
               "kl_budget/stopped": float(self.exceeded)}
        if self.exceeded:
            out.update({"kl_budget/stop_step": float(self.stop_step), "kl_budget/stop_kl": self.stop_kl})
        return out

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _nats(kl: float | None, se: float | None) -> str:
    return f"{kl:.3f}" + (f" +- {se:.3f}" if se is not None else "") + " nats"
