"""Setting a training run up: every check, the accelerator, the models, the data, the optimizer and a resumed
state, gathered in one `Run` that the loop (`hypo.training.trainer`) reads top to bottom."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hypo.config import HyPOConfig, save_config
from hypo.data.batches import PairCollator, PromptCollator, ShuffledBatches, pair_length, prompt_length
from hypo.data.sources import InMemoryRows, TrainingData
from hypo.models.loading import GivenModels, load_policy_and_reference, resolve_model_path
from hypo.models.reference import Reference
from hypo.models.tokens import stop_token_ids
from hypo.runtime.accelerator import make_accelerator, seed_everything
from hypo.runtime.distributed import refuse_fsdp1
from hypo.training.backward import configure_deepspeed, runs_one_backward
from hypo.training.checkpoints import (
    STATE_DIR,
    TrainerState,
    checkpoint_step,
    move_aside,
    run_folder,
    skip_model_weights,
)
from hypo.training.kl_budget import KLBudget
from hypo.training.preflight import check_run_inputs
from hypo.training.steps import StepContext
from hypo.training.tracking import RunLogger


@dataclass(frozen=True)
class RunInputs:
    """What a run is handed besides its config (`HyPOTrainer`): loaded objects, rows in memory, and the data the
    pre-flight check (`check_run_inputs`) returned when it already ran on them."""

    models: GivenModels = field(default_factory=GivenModels)
    rows: InMemoryRows = field(default_factory=InMemoryRows)
    data: TrainingData | None = None


@dataclass
class Run:
    """A training run once set up: what the loop reads, and what it changes (the batches' positions, the
    optimizer, the schedule, `state`)."""

    config: HyPOConfig
    accelerator: Any
    output_dir: Path
    resumed_from: Path | None  # the checkpoint this run continues, or None for a new run
    tokenizer: Any
    policy: torch.nn.Module  # as prepared by accelerate (DDP wrapper etc.)
    reference: Reference
    data: TrainingData
    pairs: ShuffledBatches
    prompts: ShuffledBatches | None  # HyPO's unlabeled prompts; None for DPO
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    state: TrainerState  # step and reference cache, saved with each checkpoint
    ctx: StepContext  # what the step functions read
    logger: RunLogger
    start_step: int  # optimizer steps already done (a resumed run)
    total_steps: int
    one_backward: bool  # DeepSpeed: one backward of the summed loss per micro-step

    @property
    def online(self) -> bool:
        """HyPO adds the online term; DPO trains on the offline pairs only (the one place the method branches)."""
        return self.config.method == "hypo"

    def close(self) -> None:
        """Close what the run opened (the vLLM sampler, the trackers), on success or error."""
        if self.ctx.vllm_sampler is not None:
            self.ctx.vllm_sampler.close()
        self.logger.close()


def make_optimizer(parameters: list[torch.nn.Parameter], config: HyPOConfig, device: torch.device):
    """AdamW; the fused kernel on CPU and CUDA (one pass over the parameters: 0.29 s -> 0.09 s per step for
    135M parameters on 2 CPU cores, same update within float tolerance), the default elsewhere."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, **fused)


def shares_prompt_forward(config: HyPOConfig, device: torch.device) -> bool:
    """Each prompt run once (its keys/values reused by its completions) where that is faster: on CPUs, not on
    GPUs (docs/performance.md), unless set; never with gradient checkpointing."""
    wanted = config.share_prompt_forward if config.share_prompt_forward is not None else device.type == "cpu"
    return wanted and not config.gradient_checkpointing


def training_batches(config: HyPOConfig, data: TrainingData, pad_token_id: int, accelerator,
                     start_step: int) -> tuple[ShuffledBatches, ShuffledBatches | None]:
    """This process's endless batches of pairs and (HyPO) of unlabeled prompts, continuing after `start_step`
    optimizer steps (a resumed run draws what the uninterrupted one would)."""
    shard = {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
             "device": accelerator.device, "start": start_step * config.gradient_accumulation_steps}
    grouped = config.group_by_length
    pairs = ShuffledBatches(data.pairs, config.per_device_train_batch_size, PairCollator(pad_token_id),
                            seed=config.seed, what="pairs", **shard,
                            lengths=[pair_length(item) for item in data.pairs] if grouped else None)
    prompts = None
    if config.method == "hypo":
        prompts = ShuffledBatches(data.prompts, config.per_device_prompt_batch_size, PromptCollator(pad_token_id),
                                  seed=config.seed + 1, what="prompts", **shard,
                                  lengths=[prompt_length(item) for item in data.prompts] if grouped else None)
    return pairs, prompts


def count_steps(config: HyPOConfig, pairs: ShuffledBatches, num_processes: int) -> int:
    """`max_steps`, or the optimizer steps of `num_train_epochs` over the pairs."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = pairs.batches_per_epoch / num_processes / config.gradient_accumulation_steps
    return max(1, math.ceil(config.num_train_epochs * per_epoch))


def prepare_run(config: HyPOConfig, inputs: RunInputs | None = None) -> Run:
    """Check every input, then set the run up: run folder, accelerator, policy and reference (or the objects in
    `inputs`), data, optimizer and schedule (under accelerate), the resumed state, the step context (with a vLLM
    engine that holds the policy's weights when `use_vllm`), and the metrics logger. Nothing heavy loads before
    the checks pass."""
    from transformers import get_scheduler

    inputs = inputs or RunInputs()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    output_dir, checkpoint = run_folder(config)  # checked before anything is written or loaded
    # every data row, the judge, the model paths, rows per batch: the tokenized data (HyPOTrainer checked already)
    data = inputs.data if inputs.data is not None else check_run_inputs(config, inputs.rows, inputs.models)
    trackers = [t.strip() for t in config.report_to.split(",") if t.strip() not in ("", "none")]
    accelerator = make_accelerator(mixed_precision=config.mixed_precision, trackers=trackers, project_dir=output_dir,
                                   timeout_seconds=config.ddp_timeout)
    refuse_fsdp1(accelerator)  # before any model loads
    check_kl_budget_support(accelerator, config)
    seed_everything(config.seed)
    if accelerator.is_main_process and checkpoint is None:
        move_aside(output_dir)  # only with overwrite_output_dir: run_folder refused otherwise
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir)
    accelerator.wait_for_everyone()

    tokenizer, policy, reference = load_policy_and_reference(config, checkpoint, inputs.models)
    start_step = checkpoint_step(checkpoint) if checkpoint else 0
    pairs, prompts = training_batches(config, data, tokenizer.pad_token_id, accelerator, start_step)
    total_steps = count_steps(config, pairs, accelerator.num_processes)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config, accelerator.device)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    configure_deepspeed(accelerator, config)  # a no-op without DeepSpeed
    policy, optimizer = accelerator.prepare(policy, optimizer)  # the policy's forward runs under autocast
    reference.prepare(accelerator)  # on the device, under the same autocast, never wrapped for training
    state = TrainerState(step=start_step, ref_cache={} if config.precompute_ref_log_probs else None,
                         kl_budget=KLBudget(config.target_kl, config.target_kl_margin) if config.target_kl else None)
    accelerator.register_for_checkpointing(scheduler, state)
    skip_model_weights(accelerator)  # checkpoints hold the weights once, in Hugging Face format
    if checkpoint:
        accelerator.load_state(str(checkpoint / STATE_DIR))  # optimizer, schedule, RNG, state
    sampler = accelerator.unwrap_model(policy)
    ctx = StepContext(policy=policy, sampler=sampler, reference=reference, config=config,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(sampler, tokenizer),
                      share_prompt=shares_prompt_forward(config, accelerator.device),
                      ref_cache=state.ref_cache, accelerator=accelerator)
    run_logger = RunLogger(output_dir, accelerator, trackers, config.to_dict(),
                           resume_after=start_step if checkpoint else None)
    run = Run(config=config, accelerator=accelerator, output_dir=output_dir, resumed_from=checkpoint,
              tokenizer=tokenizer, policy=policy, reference=reference, data=data, pairs=pairs, prompts=prompts,
              trainable=trainable, optimizer=optimizer, scheduler=scheduler, state=state, ctx=ctx, logger=run_logger,
              start_step=start_step, total_steps=total_steps,
              one_backward=runs_one_backward(accelerator, config.method == "hypo"))
    if run.online and config.use_vllm:  # samples from a vLLM engine that gets the policy's weights every step
        from hypo.sampling.vllm import make_vllm_sampler
        from hypo.sampling.vllm.weights import push_policy

        try:
            ctx.vllm_sampler = make_vllm_sampler(config, resolve_model_path(config.model_name_or_path, config.gguf_file))
            push_policy(accelerator, policy, ctx.vllm_sampler)  # a resumed run's weights, not the base model's
        except BaseException:
            run.close()
            raise
    return run


def check_kl_budget_support(accelerator, config: HyPOConfig) -> None:
    """target_kl goes back to the state it kept by loading its weights into the policy, which hypo does not do
    for sharded models (FSDP2, ZeRO-3): refused before any model loads."""
    from hypo.runtime.distributed import uses_zero3

    if config.target_kl is not None and (accelerator.is_fsdp2 or uses_zero3(accelerator)):
        raise ValueError("target_kl is not supported with sharded training (FSDP2, ZeRO-3) yet: it loads the kept "
                         "state's weights back into the policy; use DDP or one process, or drop target_kl")
