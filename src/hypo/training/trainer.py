"""The training loop: DPO on offline pairs, plus (HyPO) the online reverse-KL term on fresh samples.

Algorithm 1 of Song et al., arXiv 2406.01462: each optimizer step takes a batch of preference pairs
and, for HyPO, samples `num_generations` completions from the current policy for a batch of unlabeled
prompts, then minimizes  loss_dpo + kl_coef * loss_kl  (docs/design.md: the objective). Set-up is
`hypo.training.setup.prepare_run`; the step math is in `hypo.training.steps`; saving in
`hypo.training.checkpoints`. The loop runs unchanged on one CPU, one GPU or many processes under
`accelerate launch`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hypo.config import HyPOConfig
from hypo.evaluation.held_out import evaluate_during_training
from hypo.evaluation.pairs import evaluate_pairs
from hypo.training.backward import deepspeed_micro_step, gradient_sync
from hypo.training.checkpoints import save_checkpoint, save_model
from hypo.training.hub import share_trained_model
from hypo.training.setup import Run, prepare_run
from hypo.training.steps import StepSamples, dpo_step, kl_step
from hypo.training.stopping import (
    NonFiniteError,
    StopSignals,
    TrainingInterrupted,
    check_finite_weights,
    last_checkpoint,
    non_finite_part,
)

__all__ = ["NonFiniteError", "RunResult", "TrainingInterrupted", "train"]


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    is_main_process: bool = True
    hub_url: str | None = None


def train(config: HyPOConfig) -> RunResult:
    """Fine-tune with HyPO or DPO as configured; write config, metrics, the model and its evaluation.

    Raises `TrainingInterrupted` after saving a checkpoint when SIGINT or SIGTERM arrives, and
    `NonFiniteError` (without stepping the optimizer) when a loss or the gradient is not finite."""
    from tqdm.auto import tqdm

    run = prepare_run(config)  # checks, accelerator, models, data, optimizer, resumed state
    stop = StopSignals()
    try:
        accelerator, policy, ctx, ga = run.accelerator, run.policy, run.ctx, config.gradient_accumulation_steps
        policy.train()
        reference_samples: dict = {}  # the frozen reference's evaluation samples, drawn once per run
        start, final_metrics = time.perf_counter(), {}
        progress = tqdm(range(run.start_step + 1, run.total_steps + 1), desc=config.method, initial=run.start_step,
                        total=run.total_steps, disable=not accelerator.is_local_main_process)
        for step in progress:
            timer, step_start = ctx.timer.reset(), time.perf_counter()
            sums: dict[str, float] = defaultdict(float)
            tokens, finite = torch.zeros((), device=accelerator.device), torch.ones(2, device=accelerator.device)
            # the online samples of the whole step: one sampling call for all micro-steps (steps_per_generation);
            # with a vLLM server, requested now and drawn while the offline terms run
            online_samples = StepSamples(ctx, [next(run.prompts) for _ in range(ga)]) if run.online else None
            for micro in range(ga):
                last_micro = micro == ga - 1
                backward_options = deepspeed_micro_step(accelerator, last_micro)  # {} unless DeepSpeed
                # 1. offline term on a batch of pairs, backpropagated at once: its activations are freed
                #    before sampling starts (peak memory is the larger term, not the sum)
                with gradient_sync(accelerator, policy, sync=last_micro and not run.online):
                    offline = dpo_step(ctx, next(run.pairs))
                    if not run.one_backward:
                        accelerator.backward(offline.loss / ga, **backward_options)
                loss, metrics, tokens = offline.loss.detach(), offline.metrics, tokens + offline.tokens
                finite[0] *= torch.isfinite(loss)
                # 2. (HyPO) online term: k fresh samples per prompt from the current policy
                if run.online:
                    with gradient_sync(accelerator, policy, sync=last_micro):
                        prompt_batch, samples, decoding_steps = online_samples.take(micro)
                        kl = kl_step(ctx, prompt_batch, samples, decoding_steps=decoding_steps)
                        online_loss = config.kl_coef * kl.loss  # loss = loss_dpo + lambda * loss_kl
                        accelerator.backward((offline.loss + online_loss if run.one_backward else online_loss) / ga,
                                             **backward_options)
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

            step_seconds = time.perf_counter() - step_start
            if problem or step % config.logging_steps == 0 or step == run.total_steps:
                final_metrics = step_metrics(run, sums, grad_norm, tokens, timer.seconds, step_seconds)
                run.logger.log(final_metrics, step)
                progress.set_postfix({k.split("/")[-1]: f"{final_metrics[k]:.3g}" for k in
                                      ("loss", "rewards/margins", "objective/kl") if k in final_metrics})
            if problem:
                raise NonFiniteError(step, problem, last_checkpoint(run.output_dir))
            stopping = stop.received(accelerator) and step < run.total_steps  # every process agrees
            if stopping or (config.save_steps and step % config.save_steps == 0 and step < run.total_steps):
                saved = save(run, step)
                if stopping:
                    raise TrainingInterrupted(stop.signal, step, saved)
            if config.eval_steps and step % config.eval_steps == 0 and \
                    not (step == run.total_steps and config.eval_at_end):  # the final evaluation covers the last step
                evaluate(run, step, reference_samples)
        stop.restore()
        return finish(run, time.perf_counter() - start, final_metrics, reference_samples)
    finally:
        stop.restore()
        run.close()


def optimizer_step(run: Run, finite: torch.Tensor) -> tuple[Any, str | None]:
    """Clip (or measure) the gradient, then step the optimizer and the schedule unless a loss term or the
    gradient is not finite on some process; the gradient is cleared either way. Returns the gradient norm and
    what was not finite (None when the step was taken)."""
    accelerator, config = run.accelerator, run.config
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


def save(run: Run, step: int) -> Path:
    """A checkpoint after `step` (every process joins)."""
    run.state.step = step
    return save_checkpoint(run.accelerator, run.policy, run.tokenizer, run.output_dir, step, run.config.save_total_limit)


def evaluate(run: Run, step: int, reference_samples: dict, *,
             final: bool = False) -> tuple[dict[str, Any] | None, dict[str, float] | None]:
    """The held-out evaluations of `step`, logged as eval_*: samples of the held-out prompts (reverse KL, judged
    win rate; `final` also writes eval_results.json) and the held-out pairs (eval_loss, eval_rewards/*). Every
    process joins. Returns the prompt evaluation (on the main process) and the pair metrics, None where absent."""
    results = pair_metrics = None
    if run.data.eval_prompts:
        results = evaluate_during_training(run.accelerator, run.policy, run.reference, run.tokenizer, run.data,
                                           run.config, run.logger, step, final=final, output_dir=run.output_dir,
                                           baseline_samples=reference_samples)
    if run.data.eval_pairs:
        pair_metrics = evaluate_pairs(run.ctx, run.data.eval_pairs, batch_size=run.config.per_device_eval_batch_size,
                                      accelerator=run.accelerator)
        run.logger.log(pair_metrics, step)
    return results, pair_metrics


def finish(run: Run, seconds: float, final_metrics: dict[str, float], reference_samples: dict) -> RunResult:
    """After the last step: the final model (never a non-finite one), its evaluation, its model card and (with
    push_to_hub) its upload."""
    accelerator, config = run.accelerator, run.config
    check_finite_weights(accelerator, accelerator.unwrap_model(run.policy), run.total_steps, run.output_dir)
    model_dir = run.output_dir / "model"
    save_model(accelerator, run.policy, run.tokenizer, model_dir)
    result = RunResult(run.output_dir, model_dir, run.total_steps, seconds, final_metrics,
                       is_main_process=accelerator.is_main_process)
    pair_metrics = None
    if config.eval_at_end:
        result.eval, pair_metrics = evaluate(run, run.total_steps, reference_samples, final=True)
    if accelerator.is_main_process:  # the model card; with push_to_hub, the upload
        result.hub_url = share_trained_model(config, model_dir, output_dir=run.output_dir, eval_results=result.eval,
                                             pair_metrics=pair_metrics, final_metrics=final_metrics,
                                             num_processes=accelerator.num_processes)
    accelerator.wait_for_everyone()
    return result


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
