"""The training loop: DPO on offline pairs, plus (HyPO) the online reverse-KL term on fresh samples.

Algorithm 1 of Song et al., arXiv 2406.01462: each optimizer step takes a batch of preference pairs
and, for HyPO, samples `num_generations` completions from the current policy for a batch of unlabeled
prompts, then minimizes  loss_dpo + kl_coef * loss_kl  (docs/design.md: the objective). Set-up is
`hypo.training.setup.prepare_run`; the step math is in `hypo.training.steps`; saving in
`hypo.training.checkpoints`. The loop runs unchanged on one CPU, one GPU or many processes under
`accelerate launch`. `hypo.train`, `hypo train` and `HyPOTrainer.train` all run `run_training`; it calls
transformers' `TrainerCallback` events (`hypo.training.callbacks`) and keeps a KL budget (`target_kl`,
`hypo.training.kl_budget`).
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hypo.config import HyPOConfig
from hypo.evaluation.held_out import evaluate_during_training
from hypo.evaluation.pairs import evaluate_pairs
from hypo.models.loading import load_saved_weights
from hypo.training.backward import backward, deepspeed_optimizer_step, gradient_sync, uses_deepspeed
from hypo.training.callbacks import TrainingEvents
from hypo.training.checkpoints import save_checkpoint, save_model
from hypo.training.hub import share_trained_model
from hypo.training.setup import Run
from hypo.training.steps import StepSamples, dpo_step, kl_step
from hypo.training.stopping import (
    NonFiniteError,
    StopSignals,
    TrainingInterrupted,
    check_finite_weights,
    last_checkpoint,
    non_finite_part,
)

__all__ = ["NonFiniteError", "RunResult", "TrainingInterrupted", "run_training", "train"]


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    steps: int  # optimizer steps done (fewer than max_steps when a callback or the KL budget stopped the run)
    seconds: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    is_main_process: bool = True
    hub_url: str | None = None
    stopped_early: str | None = None  # why the run ended before max_steps (a callback, the KL budget)
    kept_step: int | None = None  # with target_kl: the step whose state is the final model
    eval_pairs: dict[str, float] | None = None  # the final evaluation's held-out pair metrics (eval_loss, ...)

    @property
    def global_step(self) -> int:
        """TRL's name (`TrainOutput.global_step`)."""
        return self.steps


def train(config: HyPOConfig) -> RunResult:
    """Fine-tune with HyPO or DPO as configured; write config, metrics, the model and its evaluation: the run of
    `HyPOTrainer(args=config).train()` (`hypo.training.hypo_trainer`).

    Raises `TrainingInterrupted` after saving a checkpoint when SIGINT or SIGTERM arrives, and
    `NonFiniteError` (without stepping the optimizer) when a loss or the gradient is not finite."""
    from hypo.training.hypo_trainer import HyPOTrainer

    return HyPOTrainer(args=config).train()


@dataclass
class LoopInputs:
    """What the loop needs besides the `Run`: the callbacks, the reference's evaluation samples (drawn once per
    run, kept across `evaluate` calls), and two facts about what the run was handed."""

    events: TrainingEvents
    reference_samples: dict = field(default_factory=dict)
    reference_is_initial_policy: bool = True  # the KL of the initial model is then exactly 0
    card_data: dict[str, str] | None = None  # the model card's data lines for rows handed over in memory


def run_training(run: Run, loop: LoopInputs) -> RunResult:
    """The loop, from `run.start_step` to `run.total_steps`, or until a callback (`control.should_training_stop`)
    or the KL budget (`target_kl`) stops it; then `finish`."""
    from tqdm.auto import tqdm

    stop = StopSignals()
    try:
        accelerator, policy, ctx, config, events = run.accelerator, run.policy, run.ctx, run.config, loop.events
        ga, budget = config.gradient_accumulation_steps, run.state.kl_budget
        policy.train()
        start, final_metrics, step = time.perf_counter(), {}, run.start_step
        events.train_begin()
        if budget is not None:
            start_kl_budget(run, loop)
        progress = tqdm(range(run.start_step + 1, run.total_steps + 1), desc=config.method, initial=run.start_step,
                        total=run.total_steps, disable=not accelerator.is_local_main_process)
        for step in progress:
            events.step_begin(step)
            timer = ctx.timer.reset()
            step_start = timer.now()  # every clock read waits for the GPU (`StepTimer.now`)
            sums: dict[str, float] = defaultdict(float)
            tokens, finite = torch.zeros((), device=accelerator.device), torch.ones(2, device=accelerator.device)
            # the online samples of the whole step: one sampling call for all micro-steps (steps_per_generation);
            # with a vLLM server, requested now and drawn while the offline terms run
            online_samples = StepSamples(ctx, [next(run.prompts) for _ in range(ga)]) if run.online else None
            for micro in range(ga):
                last_micro = micro == ga - 1
                # 1. offline term on a batch of pairs, backpropagated at once: its activations are freed
                #    before sampling starts (peak memory is the larger term, not the sum)
                with gradient_sync(accelerator, policy, sync=last_micro and not run.online):
                    offline = dpo_step(ctx, next(run.pairs))
                    if not run.one_backward:
                        backward(accelerator, offline.loss / ga, last_micro=last_micro)
                loss, metrics, tokens = offline.loss.detach(), offline.metrics, tokens + offline.tokens
                finite[0] *= torch.isfinite(loss)
                # 2. (HyPO) online term: k fresh samples per prompt from the current policy
                if run.online:
                    with gradient_sync(accelerator, policy, sync=last_micro):
                        prompt_batch, samples, decoding_steps = online_samples.take(micro)
                        kl = kl_step(ctx, prompt_batch, samples, decoding_steps=decoding_steps)
                        online_loss = config.kl_coef * kl.loss  # loss = loss_dpo + lambda * loss_kl
                        backward(accelerator, (offline.loss + online_loss if run.one_backward else online_loss) / ga,
                                 last_micro=last_micro)
                    loss, metrics, tokens = loss + online_loss.detach(), {**metrics, **kl.metrics}, tokens + kl.tokens
                    finite[1] *= torch.isfinite(online_loss.detach())
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] += float(value) / ga
            # 3. one optimizer step on the accumulated gradient, never on a non-finite one
            with timer("optimizer"):
                grad_norm, problem = optimizer_step(run, finite)
            if ctx.vllm_sampler is not None and problem is None:
                from hypo.sampling.vllm.weights import push_policy

                with timer("weight_push"):  # the engine samples step t + 1 from the weights after step t
                    push_policy(accelerator, policy, ctx.vllm_sampler)

            step_seconds = timer.now() - step_start
            events.step_end(step)
            events.agree(accelerator)  # a flag a callback set on any process holds on all: the decisions are collective
            if problem or step % config.logging_steps == 0 or step == run.total_steps or events.control.should_log:
                final_metrics = step_metrics(run, sums, grad_norm, tokens, timer.seconds, step_seconds)
                run.logger.log(final_metrics, step)  # the callbacks' on_log, through the logger
                progress.set_postfix({k.split("/")[-1]: f"{final_metrics[k]:.3g}" for k in
                                      ("loss", "rewards/margins", "objective/kl") if k in final_metrics})
            if problem:
                raise NonFiniteError(step, problem, last_checkpoint(run.output_dir))
            # 4. checkpoints, stop signals and evaluations; the run ends at max_steps or when asked to
            events.agree(accelerator)  # and the flags set in on_log (the main process)
            last = step == run.total_steps or events.control.should_training_stop
            stopping = stop.received(accelerator) and not last
            if stopping or events.control.should_save or \
                    (config.save_steps and step % config.save_steps == 0 and not last):
                saved = save(run, step, events)
                if stopping:
                    raise TrainingInterrupted(stop.signal, step, saved)
            if evaluates_now(run, step, last, events):
                _, _, eval_metrics = evaluate(run, step, loop.reference_samples, events)
                if budget is not None and not keep_within_kl_budget(run, step, eval_metrics, events):
                    last = True
                events.agree(accelerator)
                last = last or events.control.should_training_stop
            if last:
                break
        stop.restore()
        return finish(run, step, time.perf_counter() - start, final_metrics, loop)
    finally:
        stop.restore()


def evaluates_now(run: Run, step: int, last: bool, events: TrainingEvents) -> bool:
    """Whether the periodic evaluation runs after `step`: every `eval_steps`, or when a callback asks; at the last
    step only with a KL budget (its last state is measured like the others before it can be kept), since the final
    evaluation covers it otherwise (when `eval_at_end`)."""
    config = run.config
    if last and config.target_kl is not None:
        return True
    if last and config.eval_at_end:
        return False
    return bool(config.eval_steps and step % config.eval_steps == 0) or events.control.should_evaluate


def optimizer_step(run: Run, finite: torch.Tensor) -> tuple[Any, str | None]:
    """Clip (or measure) the gradient, then step the optimizer and the schedule unless a loss term or the
    gradient is not finite on some process; the gradient is cleared either way. Returns the gradient norm and
    what was not finite (None when the step was taken). Under DeepSpeed the engine steps (and clips) here too."""
    accelerator, config = run.accelerator, run.config
    if uses_deepspeed(accelerator):
        grad_norm, problem = deepspeed_optimizer_step(accelerator, finite)
        if problem is None:
            run.scheduler.step()
        return grad_norm, problem
    grad_norm = accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm) if config.max_grad_norm \
        else gradient_norm(run.trainable)
    problem = non_finite_part(accelerator, finite, grad_norm)
    if problem == "the gradient norm" and accelerator.scaler is not None:
        problem = None  # fp16 loss scaling: the scaler skips this step and lowers its scale
    if problem is None:
        run.optimizer.step()
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, problem




def save(run: Run, step: int, events: TrainingEvents | None = None) -> Path:
    """A checkpoint after `step` (every process joins); never rotates away the state a KL budget keeps."""
    run.state.step = step
    budget = run.state.kl_budget
    protect = budget.kept_checkpoint(run.output_dir) if budget is not None and budget.kept_step is not None else None
    path = save_checkpoint(run.accelerator, run.policy, run.tokenizer, run.output_dir, step,
                           run.config.save_total_limit, protect=protect)
    if events is not None:
        events.save()
    return path


def evaluate(run: Run, step: int, reference_samples: dict, events: TrainingEvents | None = None, *,
             final: bool = False) -> tuple[dict[str, Any] | None, dict[str, float] | None, dict[str, float]]:
    """The held-out evaluations of `step`, logged as eval_*: samples of the held-out prompts (reverse KL, judged
    win rate; `final` also writes eval_results.json) and the held-out pairs (eval_loss, eval_rewards/*). Every
    process joins. Returns the prompt evaluation (on the main process), the pair metrics (None where absent) and
    every eval_* metric, the same on every process (sent from the main process), which the callbacks get in
    `on_evaluate`."""
    results = pair_metrics = None
    if run.data.eval_prompts:
        results = evaluate_during_training(run.accelerator, run.policy, run.reference, run.tokenizer, run.data,
                                           run.config, run.logger, step, final=final, output_dir=run.output_dir,
                                           baseline_samples=reference_samples)
    if run.data.eval_pairs:
        pair_metrics = evaluate_pairs(run.ctx, run.data.eval_pairs, batch_size=run.config.per_device_eval_batch_size,
                                      accelerator=run.accelerator)
        run.logger.log(pair_metrics, step)
    metrics = {f"eval_{k}": v for k, v in results["metrics"].items()} if results else {}
    metrics = shared_from_main_process(run.accelerator, {**metrics, **(pair_metrics or {})})
    if events is not None:
        events.evaluate(metrics)
    return results, pair_metrics, metrics


def shared_from_main_process(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """The main process's `metrics` on every process (one broadcast when there are several)."""
    if accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([metrics], from_process=0)[0]


def start_kl_budget(run: Run, loop: LoopInputs) -> None:
    """The first state a KL budget keeps: the initial model, saved as checkpoint-0. Its KL is exactly 0 when the
    reference is the initial policy; otherwise it is evaluated first, and a start beyond the budget is an error.
    A resumed run continues with the state its checkpoint kept, which must still be there."""
    budget = run.state.kl_budget
    if budget.kept_step is not None:
        if not budget.kept_checkpoint(run.output_dir).is_dir():
            raise FileNotFoundError(f"target_kl: {budget.kept_checkpoint(run.output_dir)}, the state this run keeps "
                                    f"within the budget, is missing; resume from a later checkpoint")
        return
    kl = se = None
    if not loop.reference_is_initial_policy:
        _, _, metrics = evaluate(run, 0, loop.reference_samples, loop.events)
        kl, se = metrics["eval_objective/kl"], metrics["eval_objective/kl_se"]
    if not budget.record(0, kl, se):
        raise ValueError(f"target_kl: the initial model is already beyond the budget ({budget.summary()}); "
                         "nothing within it to keep")
    save(run, 0, loop.events)


def keep_within_kl_budget(run: Run, step: int, metrics: dict[str, float], events: TrainingEvents) -> bool:
    """After the evaluation of `step`: a state within the KL budget becomes the kept one, saved now as a checkpoint
    whose state says so (rewritten if `save_steps` wrote one before the evaluation), and the previous kept
    checkpoint goes unless `save_steps` made it; True. A state beyond it: False (the run stops)."""
    budget, save_steps = run.state.kl_budget, run.config.save_steps
    previous = budget.kept_step
    if not budget.record(step, metrics["eval_objective/kl"], metrics["eval_objective/kl_se"]):
        return False
    save(run, step, events)
    made_by_save_steps = bool(save_steps) and previous > 0 and previous % save_steps == 0
    if previous != step and not made_by_save_steps and run.accelerator.is_main_process:
        shutil.rmtree(run.output_dir / f"checkpoint-{previous}", ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return True


def finish(run: Run, step: int, seconds: float, final_metrics: dict[str, float], loop: LoopInputs) -> RunResult:
    """After the last step (`step`): past a KL budget, the policy goes back to the state it kept; then the final
    model (never a non-finite one), its evaluation, its model card and (with push_to_hub) its upload."""
    accelerator, config, budget = run.accelerator, run.config, run.state.kl_budget
    stopped_early = None
    if budget is not None and budget.exceeded:
        load_saved_weights(accelerator.unwrap_model(run.policy), budget.kept_checkpoint(run.output_dir))
        stopped_early = f"KL budget: {budget.summary()}"
    elif step < run.total_steps:
        stopped_early = f"a callback set control.should_training_stop after step {step}"
    check_finite_weights(accelerator, accelerator.unwrap_model(run.policy), step, run.output_dir)
    model_dir = run.output_dir / "model"
    save_model(accelerator, run.policy, run.tokenizer, model_dir)
    result = RunResult(run.output_dir, model_dir, step, seconds, final_metrics,
                       is_main_process=accelerator.is_main_process, stopped_early=stopped_early,
                       kept_step=budget.kept_step if budget is not None else None)
    if config.eval_at_end:
        result.eval, result.eval_pairs, _ = evaluate(run, step, loop.reference_samples, loop.events, final=True)
    if budget is not None:
        run.logger.log(budget.metrics(), step)
    if accelerator.is_main_process:  # the model card; with push_to_hub, the upload
        result.hub_url = share_trained_model(config, model_dir, output_dir=run.output_dir, eval_results=result.eval,
                                             pair_metrics=result.eval_pairs, final_metrics=final_metrics,
                                             num_processes=accelerator.num_processes, notes=card_notes(run),
                                             data=loop.card_data)
    accelerator.wait_for_everyone()
    loop.events.train_end()
    return result


def card_notes(run: Run) -> list[str]:
    """What the model card says before the results: with a KL budget, which state was kept and why the run stopped."""
    budget = run.state.kl_budget
    return [f"Trained with a KL budget: {budget.summary()}."] if budget is not None else []


def gradient_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients (what clipping would measure)."""
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def step_metrics(run: Run, sums: dict[str, float], grad_norm, tokens: torch.Tensor, phase_seconds: dict[str, float],
                 step_seconds: float) -> dict[str, float]:
    """Average the step's metrics over processes and add learning rate, gradient norm and timing."""
    accelerator = run.accelerator
    keys = sorted(sums)
    values = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=accelerator.device), "mean")
    total_tokens = accelerator.reduce(tokens.float(), "sum")
    metrics = dict(zip(keys, values.tolist(), strict=True))
    metrics.update({
        "learning_rate": run.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "time/step": step_seconds,
        "time/generation": phase_seconds.get("generation", 0.0),
        "time/reference": phase_seconds.get("reference", 0.0),
        "time/optimizer": phase_seconds.get("optimizer", 0.0),
        **({"time/weight_push": phase_seconds["weight_push"]} if "weight_push" in phase_seconds else {}),
        "time/forward_backward": step_seconds - sum(phase_seconds.values()),
        "throughput/tokens_per_second": float(total_tokens) / step_seconds,
    })
    return metrics
