"""The training loop: DPO on offline pairs, plus (HyPO) the online reverse-KL term on fresh samples.

Algorithm 1 of Song et al., arXiv 2406.01462: each optimizer step takes a batch of preference pairs
and, for HyPO, samples `num_generations` completions from the current policy for a batch of unlabeled
prompts, then minimizes  loss_dpo + kl_coef * loss_kl  (DESIGN section 2). The step math is in
`hypo.steps`; model and data loading, saving and evaluation live in their own modules. The loop runs
unchanged on one CPU, one GPU or many processes under `accelerate launch`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hypo.config import HyPOConfig, save_config
from hypo.steps import StepContext, dpo_step, kl_step
from hypo.tracking import RunLogger


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


def make_optimizer(parameters: list[torch.nn.Parameter], config: HyPOConfig, device: torch.device):
    """AdamW; the fused kernel on CPU and CUDA (one pass over the parameters: 0.29 s -> 0.09 s per step for
    135M parameters on 2 CPU cores, same update within float tolerance), the default elsewhere."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, **fused)


def resolve_mixed_precision(mixed_precision: str) -> str:
    """`auto`: bf16 autocast on a GPU that supports it, none on CPUs (bf16 matmuls are slower there).
    fp16 needs a GPU: its loss scaling is CUDA's."""
    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("mixed_precision=fp16 needs a CUDA GPU (loss scaling); on CPUs use bf16 or no")
    return mixed_precision


def shares_prompt_forward(config: HyPOConfig, device: torch.device) -> bool:
    """Each prompt run once (its keys/values reused by its completions) where that is faster: on CPUs, not on
    GPUs (docs/performance.md), unless set; never with gradient checkpointing."""
    wanted = config.share_prompt_forward if config.share_prompt_forward is not None else device.type == "cpu"
    return wanted and not config.gradient_checkpointing


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another precision; a
    new run in the same Python process (two `hypo.train` calls) replaces it. The distributed set-up is kept."""
    from accelerate.state import AcceleratorState

    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def runs_one_backward(accelerator, online: bool) -> bool:
    """DeepSpeed counts backward calls as micro-steps: there HyPO runs one backward of the summed loss
    instead of one per term."""
    from accelerate import DistributedType

    return online and accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_batch_settings(ds_config: dict[str, Any], *, micro_batch: int, accumulation: int) -> dict[str, int]:
    """The DeepSpeed config's micro-batch and gradient accumulation that differ from the run's (`auto` and
    absent ones included): the loop takes its batches itself (no dataloader tells accelerate the micro-batch),
    and DeepSpeed steps its optimizer after `gradient_accumulation_steps` backward calls, which must be the
    loop's micro-steps.

    Example: {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4}, micro_batch 2,
    accumulation 4 -> {"train_micro_batch_size_per_gpu": 2}.
    """
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation}
    return {key: value for key, value in wanted.items() if ds_config.get(key, "auto") != value}


def configure_deepspeed(accelerator, config: HyPOConfig) -> None:
    """Under DeepSpeed, before `prepare`: the engine gets the loop's micro-batch and accumulation (a DeepSpeed
    config that says otherwise is overridden, with a warning naming its values)."""
    import logging

    plugin = accelerator.state.deepspeed_plugin
    changes = deepspeed_batch_settings(plugin.deepspeed_config, micro_batch=config.per_device_train_batch_size,
                                       accumulation=config.gradient_accumulation_steps)
    given = {key: plugin.deepspeed_config.get(key, "auto") for key in changes}
    if any(value != "auto" for value in given.values()):
        logging.getLogger(__name__).warning("DeepSpeed config %s replaced by the run's %s", given, changes)
    plugin.deepspeed_config.update(changes)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps


def deepspeed_micro_step(accelerator, last_micro: bool) -> dict[str, Any]:
    """Under DeepSpeed, accelerate's `backward` steps the engine (and its optimizer, at DeepSpeed's accumulation
    boundary) when `sync_gradients` is set, and the engine divides the loss by its accumulation steps. The loop
    runs one backward per micro-step under DeepSpeed and divides the loss itself, so: mark the last micro-step
    of an optimizer step as the boundary, and turn the engine's division off (transformers' Trainer does both
    the same way). Returns the keyword arguments of `accelerator.backward`; elsewhere nothing to do."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {}
    accelerator.gradient_state._set_sync_gradients(last_micro)
    return {"scale_wrt_gas": False}


def gradient_sync(accelerator, model, sync: bool):
    """Under data parallelism, gradients are all-reduced only in the backward passes run with sync=True
    (the last of an optimizer step); elsewhere this is a no-op."""
    return nullcontext() if sync else accelerator.no_sync(model)


def train(config: HyPOConfig) -> RunResult:
    """Fine-tune with HyPO or DPO as configured; write config, metrics, the model and its evaluation.

    Raises `TrainingInterrupted` after saving a checkpoint when SIGINT or SIGTERM arrives, and
    `NonFiniteError` (without stepping the optimizer) when a loss or the gradient is not finite."""
    from accelerate import Accelerator, DistributedType
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from hypo.checkpoints import (
        TrainerState,
        checkpoint_step,
        move_aside,
        run_folder,
        save_checkpoint,
        save_model,
        skip_model_weights,
    )
    from hypo.data import PairCollator, PromptCollator, ShuffledBatches, load_training_data
    from hypo.evaluate import evaluate_during_training, evaluate_pairs
    from hypo.hub import share_trained_model
    from hypo.models import load_policy_and_reference
    from hypo.preflight import check_run_inputs
    from hypo.sampling import stop_token_ids

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    online = config.method == "hypo"  # the one place the method decides what runs
    output_dir, checkpoint = run_folder(config)  # checked before anything is written or loaded
    check_run_inputs(config)  # every data row, the judge, the model paths
    trackers = [t.strip() for t in config.report_to.split(",") if t.strip() not in ("", "none")]
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    _forget_other_precision(mixed_precision)
    accelerator = Accelerator(log_with=trackers or None, project_dir=str(output_dir), cpu=_multi_process_cpu(),
                              mixed_precision=mixed_precision)
    seed_everything(config.seed)
    if accelerator.is_main_process and checkpoint is None:
        move_aside(output_dir)  # only with overwrite_output_dir: run_folder refused otherwise
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir)
    accelerator.wait_for_everyone()

    tokenizer, policy, reference = load_policy_and_reference(config, checkpoint)
    data = load_training_data(config, tokenizer, with_prompts=online)
    ga, start_step = config.gradient_accumulation_steps, checkpoint_step(checkpoint) if checkpoint else 0
    shard = {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
             "device": accelerator.device, "start": start_step * ga}  # batches this process has taken
    pairs = ShuffledBatches(data.pairs, config.per_device_train_batch_size, PairCollator(tokenizer.pad_token_id),
                            seed=config.seed, what="pairs", **shard)
    if online:
        prompts = ShuffledBatches(data.prompts, config.per_device_prompt_batch_size,
                                  PromptCollator(tokenizer.pad_token_id), seed=config.seed + 1, what="prompts", **shard)
    total_steps = config.max_steps if config.max_steps > 0 else \
        max(1, math.ceil(config.num_train_epochs * pairs.batches_per_epoch / accelerator.num_processes / ga))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config, accelerator.device)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, config)
    policy, optimizer = accelerator.prepare(policy, optimizer)  # the policy's forward runs under autocast
    reference.prepare(accelerator)  # on the device, under the same autocast, never wrapped for training
    state = TrainerState(step=start_step, ref_cache={} if config.precompute_ref_log_probs else None)
    accelerator.register_for_checkpointing(scheduler, state)
    skip_model_weights(accelerator)  # checkpoints hold the weights once, in Hugging Face format
    if checkpoint:
        accelerator.load_state(str(checkpoint / "training_state"))  # optimizer, schedule, RNG, state
    sampler = accelerator.unwrap_model(policy)
    ctx = StepContext(policy=policy, sampler=sampler, reference=reference, config=config,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(sampler, tokenizer),
                      share_prompt=shares_prompt_forward(config, accelerator.device),
                      ref_cache=state.ref_cache, accelerator=accelerator)
    if online and config.use_vllm:  # samples from a vLLM engine that gets the policy's weights every step
        from hypo.models import resolve_model_path
        from hypo.vllm_sampling import make_vllm_sampler, push_policy

        ctx.vllm_sampler = make_vllm_sampler(config, resolve_model_path(config.model_name_or_path, config.gguf_file))
        push_policy(accelerator, policy, ctx.vllm_sampler)  # a resumed run's weights, not the base model's
    one_backward = runs_one_backward(accelerator, online)
    run_logger = RunLogger(output_dir, accelerator, trackers, config.to_dict(), resume_after=start_step if checkpoint else None)

    def save(step: int) -> Path:
        state.step = step
        return save_checkpoint(accelerator, policy, tokenizer, output_dir, step, config.save_total_limit)

    policy.train()
    reference_samples: dict = {}  # the frozen reference's evaluation samples, drawn once per run
    start, final_metrics, stop = time.perf_counter(), {}, StopSignals()
    progress = tqdm(range(start_step + 1, total_steps + 1), desc=config.method, initial=start_step, total=total_steps,
                    disable=not accelerator.is_local_main_process)
    for step in progress:
        timer, step_start = ctx.timer.reset(), time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        tokens, finite = torch.zeros((), device=accelerator.device), torch.ones(2, device=accelerator.device)
        for micro in range(ga):
            last_micro = micro == ga - 1
            backward_options = deepspeed_micro_step(accelerator, last_micro)  # {} unless DeepSpeed
            # 1. offline term on a batch of pairs, backpropagated at once: its activations are freed
            #    before sampling starts (peak memory is the larger term, not the sum)
            with gradient_sync(accelerator, policy, sync=last_micro and not online):
                offline = dpo_step(ctx, next(pairs))
                if not one_backward:
                    accelerator.backward(offline.loss / ga, **backward_options)
            loss, metrics, tokens = offline.loss.detach(), offline.metrics, tokens + offline.tokens
            finite[0] *= torch.isfinite(loss)
            # 2. (HyPO) online term: k fresh samples per prompt from the current policy
            if online:
                with gradient_sync(accelerator, policy, sync=last_micro):
                    kl = kl_step(ctx, next(prompts))
                    online_loss = config.kl_coef * kl.loss  # loss = loss_dpo + lambda * loss_kl
                    accelerator.backward((offline.loss + online_loss if one_backward else online_loss) / ga,
                                         **backward_options)
                loss, metrics, tokens = loss + online_loss.detach(), {**metrics, **kl.metrics}, tokens + kl.tokens
                finite[1] *= torch.isfinite(online_loss.detach())
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] += float(value) / ga
        # 3. one optimizer step on the accumulated gradient, never on a non-finite one
        with timer("optimizer"):
            grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm) if config.max_grad_norm \
                else _grad_norm(trainable)
            problem = _non_finite(accelerator, finite, grad_norm)
            if problem == "the gradient norm" and accelerator.scaler is not None:
                problem = None  # fp16 loss scaling: the scaler skips this step and lowers its scale
            if problem is None:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if ctx.vllm_sampler is not None and problem is None:
            with timer("weight_push"):  # the engine samples step t + 1 from the weights after step t
                push_policy(accelerator, policy, ctx.vllm_sampler)

        step_seconds = time.perf_counter() - step_start
        if problem or step % config.logging_steps == 0 or step == total_steps:
            final_metrics = _step_metrics(accelerator, sums, grad_norm, scheduler, tokens, timer.seconds, step_seconds)
            run_logger.log(final_metrics, step)
            progress.set_postfix({k.split("/")[-1]: f"{final_metrics[k]:.3g}" for k in
                                  ("loss", "rewards/margins", "objective/kl") if k in final_metrics})
        if problem:
            run_logger.close()
            raise NonFiniteError(step, problem, _last_checkpoint(output_dir))
        stopping = stop.received(accelerator) and step < total_steps  # every process agrees
        if stopping or (config.save_steps and step % config.save_steps == 0 and step < total_steps):
            saved = save(step)
            if stopping:
                run_logger.close()
                raise TrainingInterrupted(stop.signal, step, saved)
        if config.eval_steps and step % config.eval_steps == 0 and \
                not (step == total_steps and config.eval_at_end):  # the final evaluation covers the last step
            if data.eval_prompts:  # samples: reverse KL, judged win rate
                evaluate_during_training(accelerator, policy, reference, tokenizer, data, config, run_logger, step,
                                         baseline_samples=reference_samples)
            if data.eval_pairs:  # held-out pairs: eval_loss, eval_rewards/* (every process joins)
                run_logger.log(evaluate_pairs(ctx, data.eval_pairs, batch_size=config.per_device_eval_batch_size,
                                              accelerator=accelerator), step)
    stop.restore()
    seconds = time.perf_counter() - start

    _check_finite_weights(accelerator, accelerator.unwrap_model(policy), total_steps, output_dir)
    model_dir = output_dir / "model"
    save_model(accelerator, policy, tokenizer, model_dir)
    result = RunResult(output_dir, model_dir, total_steps, seconds, final_metrics,
                       is_main_process=accelerator.is_main_process)
    if config.eval_at_end and data.eval_prompts:
        result.eval = evaluate_during_training(accelerator, policy, reference, tokenizer, data, config, run_logger,
                                               total_steps, final=True, output_dir=output_dir,
                                               baseline_samples=reference_samples)
    pair_metrics = None
    if config.eval_at_end and data.eval_pairs:
        pair_metrics = evaluate_pairs(ctx, data.eval_pairs, batch_size=config.per_device_eval_batch_size,
                                      accelerator=accelerator)
        run_logger.log(pair_metrics, total_steps)
    if accelerator.is_main_process:  # the model card; with push_to_hub, the upload
        result.hub_url = share_trained_model(config, model_dir, output_dir=output_dir, eval_results=result.eval,
                                             pair_metrics=pair_metrics, final_metrics=final_metrics,
                                             num_processes=accelerator.num_processes)
    if ctx.vllm_sampler is not None:
        ctx.vllm_sampler.close()
    run_logger.close()
    accelerator.wait_for_everyone()
    return result


def seed_everything(seed: int) -> None:
    """Determinism in one place: Python, NumPy and torch seeds (dropout is disabled at load time,
    the reference is frozen in eval mode)."""
    from accelerate.utils import set_seed

    set_seed(seed)


def _multi_process_cpu() -> bool:
    """Several processes without a GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU
    host): accelerate then needs cpu=True to set up gloo data parallelism."""
    import os

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _grad_norm(parameters) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


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


def _non_finite(accelerator, finite: torch.Tensor, grad_norm) -> str | None:
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


def _last_checkpoint(output_dir: Path) -> Path | None:
    from hypo.checkpoints import list_checkpoints

    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _check_finite_weights(accelerator, model, step: int, output_dir: Path) -> None:
    """Never save a non-finite model as final (each process checks its shard; all agree)."""
    from hypo.distributed import all_finite

    if not all_finite(accelerator, model.parameters()):
        raise NonFiniteError(step, "a weight", _last_checkpoint(output_dir))


def _step_metrics(accelerator, sums, grad_norm, scheduler, tokens, phase_seconds: dict[str, float],
                  step_seconds: float) -> dict[str, float]:
    """Average the step's metrics over processes and add learning rate, gradient norm and timing."""
    keys = sorted(sums)
    values = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=accelerator.device), "mean")
    total_tokens = accelerator.reduce(tokens.float(), "sum")
    metrics = dict(zip(keys, values.tolist(), strict=True))
    metrics.update({
        "learning_rate": scheduler.get_last_lr()[0],
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
