"""The two terms of one micro-step (docs/design.md: the objective), as functions of a batch and the run's context.

`dpo_step` is the offline term on preference pairs; `kl_step` samples k completions per unlabeled
prompt from the current policy and builds the REINFORCE surrogate of KL(pi || pi_ref) with a
leave-one-out baseline (arXiv 2406.01462, Algorithm 1). Each returns a `Term`: the mean loss (with
grad), its metrics and the number of distinct tokens it processed. Backward passes, gradient sync and
the optimizer belong to the loop (`hypo.training.trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hypo.config import HyPOConfig
from hypo.evaluation.pairs import configured_dpo_loss, pair_token_weights
from hypo.models.reference import Reference
from hypo.objective.logprobs import grouped_completion_logps, pair_logps
from hypo.objective.losses import kl_estimates, kl_surrogate, preference_metrics
from hypo.runtime.distributed import any_process, gathered_for_generation
from hypo.sampling.generate import Completions, generate_completions
from hypo.training.tracking import StepTimer


@dataclass
class StepContext:
    """What every step reads: the models and the settings, fixed for the run, and three helpers the steps
    update: the reference cache (filled as pairs are first seen), the timer (reset each optimizer step) and
    the vLLM sampler (given the policy's weights after each optimizer step)."""

    policy: torch.nn.Module  # as prepared by accelerate (DDP wrapper etc.): gradients flow through it
    sampler: torch.nn.Module  # the module `generate` runs on: the unwrapped policy, same weights
    reference: Reference
    config: HyPOConfig
    pad_token_id: int
    eos_token_id: int | list[int]  # every stop id of the model (`hypo.models.tokens.stop_token_ids`)
    share_prompt: bool  # score completions against each prompt's cached keys/values (see logprobs)
    ref_cache: dict[int, tuple[float, float]] | None  # reference log-probs of offline pairs by row index
    timer: StepTimer = field(default_factory=StepTimer)
    vllm_sampler: Any = None  # with use_vllm: the engine that draws the online samples (`hypo.sampling.vllm`)
    accelerator: Any = None  # with several processes: keeps the reference cache in lock-step (None: one process)


@dataclass
class Term:
    """One term of the loss for one micro-batch."""

    loss: torch.Tensor  # () mean over the micro-batch, with grad
    metrics: dict[str, torch.Tensor | float]
    tokens: torch.Tensor  # () distinct tokens (each prompt once): the work a step cannot avoid


def needs_reference_forward(indices: list[int], cache: dict[int, tuple[float, float]] | None) -> bool:
    """Whether a batch of pairs must run the reference: there is no cache, or a row of it is not cached.

    Example: indices [3, 5], cache {3: ..} -> True; cache {3: .., 5: ..} -> False; cache None -> True.
    """
    return cache is None or any(i not in cache for i in indices)


@torch.no_grad()
def reference_pair_logps(ctx: StepContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of a batch of pairs; with a cache, each pair is scored once per run.

    With several processes the cache stays in lock-step: the reference runs on every process when any
    process misses (a sharded reference's forward is collective: a process that skipped it would leave the
    others waiting in its all-gather), and every process caches the rows all of them scored, so each holds
    the same cache (a row comes back on another process in a later epoch).
    """
    indices, cache = batch["index"].tolist(), ctx.ref_cache
    miss = needs_reference_forward(indices, cache)
    if cache is not None:
        miss = any_process(ctx.accelerator, miss)  # the same decision on every process
    if miss:
        with ctx.reference.active() as ref_model:
            chosen, rejected = pair_logps(ref_model, batch, pad_token_id=ctx.pad_token_id, share_prompt=ctx.share_prompt,
                                          token_weights=pair_token_weights(ctx.config, batch),
                                          fused_lm_head=ctx.config.fused_lm_head)
        if cache is None:
            return chosen, rejected
        rows = torch.stack([batch["index"].double(), chosen.double(), rejected.double()], dim=1)  # (B, 3)
        if ctx.accelerator is not None and ctx.accelerator.num_processes > 1:
            rows = ctx.accelerator.gather(rows)  # (P * B, 3): every process's rows, in process order
        cache.update({int(i): (c, r) for i, c, r in rows.tolist()})
    device = batch["index"].device
    chosen = torch.tensor([cache[i][0] for i in indices], device=device)
    rejected = torch.tensor([cache[i][1] for i in indices], device=device)
    return chosen, rejected


def dpo_step(ctx: StepContext, batch: dict[str, torch.Tensor]) -> Term:
    """Offline term: the configured loss (DPO, or any of TRL's loss types and their weighted sums) on a batch of
    pairs."""
    with ctx.timer("reference"):
        ref_chosen, ref_rejected = reference_pair_logps(ctx, batch)
    policy_chosen, policy_rejected = pair_logps(ctx.policy, batch, pad_token_id=ctx.pad_token_id,
                                                share_prompt=ctx.share_prompt,
                                                token_weights=pair_token_weights(ctx.config, batch),
                                                fused_lm_head=ctx.config.fused_lm_head)
    losses, chosen_rewards, rejected_rewards = configured_dpo_loss(ctx.config, batch, policy_chosen, policy_rejected,
                                                                   ref_chosen, ref_rejected)
    per_pair = preference_metrics(policy_chosen, policy_rejected, chosen_rewards, rejected_rewards)
    metrics = {"loss/dpo": losses.detach().mean(), **{name: values.mean() for name, values in per_pair.items()}}
    tokens = batch["prompt_attention_mask"].sum() + batch["chosen_attention_mask"].sum() + \
        batch["rejected_attention_mask"].sum()
    return Term(losses.mean(), metrics, tokens)


def sampler_logp_gap(policy_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor,
                     completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampling engine's log-probs of its own samples are from our forward's, per completion
    token: |sum of ours - sum of the engine's| / length. Near float rounding (about 5e-5 nats in fp32) when
    the engine holds the policy's current weights; stale weights or a lower engine precision show up here.

    Shape: policy_logps (N,), sampling_per_token_logps (N, C), completion_mask (N, C) -> scalars
    """
    engine = (sampling_per_token_logps.to(policy_logps.device) * completion_mask).sum(dim=-1)  # (N,)
    gap = (policy_logps - engine).abs() / completion_mask.sum(dim=-1).clamp(min=1)  # (N,)
    return {"sampler/logp_gap_mean": gap.mean(), "sampler/logp_gap_max": gap.max()}


def draw_samples(ctx: StepContext, prompt_batch: dict[str, torch.Tensor]) -> Completions:
    """k completions per prompt from the current policy in one call: exact draws (temperature 1, no truncation),
    from the vLLM engine (which holds the policy's current weights: pushed after every optimizer step) or from
    transformers' `generate` on the policy itself."""
    draw = {"num_generations": ctx.config.num_generations, "max_new_tokens": ctx.config.max_completion_length,
            "eos_token_id": ctx.eos_token_id, "pad_token_id": ctx.pad_token_id}
    if ctx.vllm_sampler is not None:
        return ctx.vllm_sampler.generate(prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"],
                                         **draw)
    with gathered_for_generation(ctx.sampler, ctx.policy) as sampler:  # sharded: full weights once per call
        return generate_completions(sampler, prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"],
                                    cache_implementation=ctx.config.cache_implementation, **draw)


def kl_step(ctx: StepContext, prompt_batch: dict[str, torch.Tensor], samples: Completions | None = None, *,
            decoding_steps: int | None = None) -> Term:
    """Online term: sample k completions per prompt from the current policy and build the REINFORCE
    surrogate of KL(pi || pi_ref) with a leave-one-out baseline (arXiv 2406.01462, Algorithm 1).

    `samples`: this micro-step's rows of a sampling call made in this optimizer step (`StepSamples`), with
    the decoding steps that call ran; drawn here when None."""
    k = ctx.config.num_generations
    if samples is None:
        with ctx.timer("generation"):
            samples = draw_samples(ctx, prompt_batch)
    num_prompts = prompt_batch["prompt_input_ids"].shape[0]
    prompt_index = torch.arange(num_prompts, device=samples.completion_ids.device).repeat_interleave(k)
    # (G * k,): rows g * k ... g * k + k - 1 continue prompt g
    sample_args = (prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"], prompt_index,
                   samples.completion_ids, samples.completion_mask)
    with ctx.timer("reference"), torch.no_grad(), ctx.reference.active() as ref_model:
        ref_logps = grouped_completion_logps(ref_model, *sample_args, share_prompt=ctx.share_prompt,
                                             fused_lm_head=ctx.config.fused_lm_head)  # (G * k,)
    policy_logps = grouped_completion_logps(ctx.policy, *sample_args, share_prompt=ctx.share_prompt,
                                            fused_lm_head=ctx.config.fused_lm_head)  # with grad
    losses = kl_surrogate(policy_logps, ref_logps, num_generations=k)
    estimates = kl_estimates(policy_logps, ref_logps)
    metrics = {
        "loss/kl": losses.detach().mean(),
        "objective/kl": estimates["k1"].mean(),
        "objective/kl_k2": estimates["k2"].mean(),
        "objective/kl_k3": estimates["k3"].mean(),
        "objective/entropy": -policy_logps.detach().mean(),
        "completions/mean_length": samples.lengths.float().mean(),
        "completions/clipped_ratio": samples.clipped.float().mean(),
        # decoding steps of the sampling call
        "completions/max_length": float(decoding_steps or samples.completion_ids.shape[1]),
    }
    if samples.sampling_per_token_logps is not None:  # an engine's own log-probs (vLLM): does it hold our weights?
        metrics.update(sampler_logp_gap(policy_logps.detach(), samples.sampling_per_token_logps, samples.completion_mask))
    tokens = prompt_batch["prompt_attention_mask"].sum() + samples.completion_mask.sum()  # each prompt once
    return Term(losses.mean(), metrics, tokens)


def join_prompt_batches(batches: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batches as one, left-padded to the longest prompt of all (rows in batch order).

    Example: prompts [[5, 6]] and [[pad, 7], [8, 9]] padded to width 2 -> [[5, 6], [pad, 7], [8, 9]];
    widths 2 and 3 -> every row padded on the left to 3.

    Shape: batches of (G_i, P_i) -> (sum G_i, max P_i)
    """
    if len(batches) == 1:
        return batches[0]
    width = max(batch["prompt_input_ids"].shape[1] for batch in batches)

    def padded(name: str, value: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(batch[name], (width - batch[name].shape[1], 0), value=value)
                          for batch in batches])

    return {"prompt_input_ids": padded("prompt_input_ids", pad_token_id),
            "prompt_attention_mask": padded("prompt_attention_mask", 0)}


class StepSamples:
    """The online samples of one optimizer step: the prompt batches of its micro-steps, sampled
    `steps_per_generation` micro-steps at a time in one call (default: all of them in one), each micro-step
    handed its own rows (`take`).

    The samples stay exact draws from the current policy: the weights do not change inside an optimizer step,
    and nothing outlives the step. Calls run when a micro-step first needs them (after its offline term, as
    with one call per micro-step), or, with a vLLM server and `vllm_server_overlap`, all at once in a
    background thread started here, before the step's offline term: the server samples while the trainer
    computes, and every request is answered before the loop pushes the next weights (each micro-step waits
    for its rows).
    """

    def __init__(self, ctx: StepContext, prompt_batches: list[dict[str, torch.Tensor]]):
        self.ctx, self.batches = ctx, prompt_batches
        per_call = ctx.config.steps_per_generation or len(prompt_batches)
        self.calls = [prompt_batches[i:i + per_call] for i in range(0, len(prompt_batches), per_call)]
        self.per_call, self.drawn = per_call, {}
        self.background = None
        if ctx.vllm_sampler is not None and ctx.config.vllm_mode == "server" and ctx.config.vllm_server_overlap:
            self.background = BackgroundCalls(lambda batches: draw_samples(ctx, join_prompt_batches(
                batches, ctx.pad_token_id)), self.calls)

    def take(self, micro: int) -> tuple[dict[str, torch.Tensor], Completions, int]:
        """Micro-step `micro`'s prompt batch, its samples (rows of its call, as if drawn alone) and the decoding
        steps of the call that drew them."""
        call, position = divmod(micro, self.per_call)
        if call not in self.drawn:
            with self.ctx.timer("generation"):  # with overlap: only the wait for the server
                self.drawn[call] = self.background.result(call) if self.background else \
                    draw_samples(self.ctx, join_prompt_batches(self.calls[call], self.ctx.pad_token_id))
        samples, k = self.drawn[call], self.ctx.config.num_generations
        start = sum(batch["prompt_input_ids"].shape[0] for batch in self.calls[call][:position])
        size = self.batches[micro]["prompt_input_ids"].shape[0]
        return self.batches[micro], samples.rows(start * k, (start + size) * k), samples.completion_ids.shape[1]


class BackgroundCalls:
    """`function(job)` for each job, one after the other, in a daemon thread started at once; `result(i)`
    waits for job i and returns its value or raises its error in the caller's thread."""

    def __init__(self, function, jobs: list):
        import threading

        self._function, self._jobs = function, jobs
        self._done = [threading.Event() for _ in jobs]
        self._values: list = [None] * len(jobs)
        self._errors: list = [None] * len(jobs)
        threading.Thread(target=self._run, name="hypo-sampling", daemon=True).start()

    def _run(self) -> None:
        for i, job in enumerate(self._jobs):
            try:
                self._values[i] = self._function(job)
            except BaseException as exc:  # handed to the caller, with every later job
                for j in range(i, len(self._jobs)):
                    self._errors[j] = exc
                    self._done[j].set()
                return
            self._done[i].set()

    def result(self, i: int):
        self._done[i].wait()
        if self._errors[i] is not None:
            raise self._errors[i]
        value, self._values[i] = self._values[i], None
        return value
