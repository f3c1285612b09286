"""Held-out preference pairs: the DPO loss and implicit rewards of the policy on pairs it was not trained on,
under TRL DPOTrainer's evaluation names."""

from __future__ import annotations

import torch

from hypo.data.batches import PairCollator
from hypo.objective.logprobs import pair_logps
from hypo.objective.losses import dpo_loss, preference_metrics

PAIR_METRICS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
"""What `evaluate_pairs` returns: TRL DPOTrainer's evaluation names (docs/design.md: names)."""


@torch.no_grad()
def pair_metric_sums(ctx, pairs: list[dict], *, batch_size: int) -> torch.Tensor:
    """Sums over `pairs` (tokenized items, `hypo.data.encoding.load_preference_data`) of the DPO loss, the implicit
    rewards and the log-probs of the policy `ctx.policy` against `ctx.reference` (a `hypo.training.steps.StepContext`),
    with the run's beta, loss_type and label_smoothing; dropout stays off. The training cache of reference
    log-probs (keyed by training row) is not used.

    Shape: -> (8,): count, then the sum of each of `PAIR_METRICS` over the pairs
    """
    config, collate = ctx.config, PairCollator(ctx.pad_token_id)
    device = next(ctx.policy.parameters()).device
    sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64, device=device)
    was_training = ctx.policy.training
    ctx.policy.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate(pairs[start : start + batch_size]).items()}
            with ctx.reference.active() as ref_model:
                ref_chosen, ref_rejected = pair_logps(ref_model, batch, pad_token_id=ctx.pad_token_id,
                                                      share_prompt=ctx.share_prompt,
                                                      fused_lm_head=config.fused_lm_head)  # (B,), (B,)
            chosen, rejected = pair_logps(ctx.policy, batch, pad_token_id=ctx.pad_token_id,
                                          share_prompt=ctx.share_prompt, fused_lm_head=config.fused_lm_head)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=config.beta, loss_type=config.loss_type,
                label_smoothing=config.label_smoothing)
            per_pair = preference_metrics(chosen, rejected, chosen_rewards, rejected_rewards)
            columns = (torch.ones_like(losses), losses, *(per_pair[name.removeprefix("eval_")] for name in PAIR_METRICS[1:]))
            sums += torch.stack([c.double().sum() for c in columns])
    finally:
        ctx.policy.train(was_training)
    return sums


def evaluate_pairs(ctx, pairs: list[dict], *, batch_size: int, accelerator=None) -> dict[str, float]:
    """Held-out pair metrics of the current policy under TRL's names (`PAIR_METRICS`): eval_loss (the DPO
    loss; HyPO's online term needs fresh samples and is not part of it), eval_rewards/{chosen, rejected,
    accuracies, margins} and eval_logps/{chosen, rejected}, each a mean over pairs.

    With an `accelerator` of several processes every process must call it (the forward passes of a sharded
    model are collective): process i scores pairs i, i + P, ... of the first P * (len(pairs) // P) pairs
    (each process the same number of batches), and the sums are added across processes.
    """
    processes = accelerator.num_processes if accelerator is not None else 1
    if processes > 1:
        pairs = pairs[: len(pairs) // processes * processes][accelerator.process_index :: processes]
    if not pairs:
        raise ValueError(f"evaluate_pairs needs at least {processes} held-out pair(s)")
    sums = pair_metric_sums(ctx, pairs, batch_size=batch_size)
    if processes > 1:
        sums = accelerator.reduce(sums, "sum")
    count, *totals = sums.tolist()
    return {name: total / count for name, total in zip(PAIR_METRICS, totals, strict=True)}
