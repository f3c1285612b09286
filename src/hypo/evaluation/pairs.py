"""Held-out preference pairs: the DPO loss and implicit rewards of the policy on pairs it was not trained on,
under TRL DPOTrainer's evaluation names."""

from __future__ import annotations

import torch

from hypo.data.batches import PairCollator
from hypo.objective.logprobs import pair_logps
from hypo.objective.losses import dpo_loss, preference_metrics
from hypo.objective.pair_losses import ld_token_weights

PAIR_METRICS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
"""What `evaluate_pairs` returns: TRL DPOTrainer's evaluation names (docs/design.md: names)."""


def pair_token_weights(config, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weight of each completion token in the pair log-probs under a `HyPOConfig`: LD-DPO's with ld_alpha,
    else None (every token once).

    Shape: batch of B pairs -> chosen (B, C), rejected (B, R), or None
    """
    if config.ld_alpha is None:
        return None
    return ld_token_weights(batch["chosen_attention_mask"], batch["rejected_attention_mask"], alpha=config.ld_alpha)


def configured_dpo_loss(config, batch: dict[str, torch.Tensor], policy_chosen: torch.Tensor,
                        policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dpo_loss` of a batch of pairs under a `HyPOConfig`'s offline-loss settings (loss types and weights, beta,
    label smoothing, f-divergence, discopop tau), with each completion's length in tokens from the batch.

    Shape: batch of B pairs, log-probs (B,) -> losses (B,), chosen_rewards (B,), rejected_rewards (B,)
    """
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=config.beta, loss_type=config.loss_types,
        loss_weights=config.loss_weights, label_smoothing=config.label_smoothing,
        chosen_lengths=batch["chosen_attention_mask"].sum(dim=-1),  # (B,)
        rejected_lengths=batch["rejected_attention_mask"].sum(dim=-1),  # (B,)
        f_divergence_type=config.f_divergence_type, f_alpha_divergence_coef=config.f_alpha_divergence_coef,
        discopop_tau=config.discopop_tau)


@torch.no_grad()
def pair_metric_sums(ctx, pairs: list[dict], *, batch_size: int) -> torch.Tensor:
    """Sums over `pairs` (tokenized items, `hypo.data.encoding.load_preference_data`) of the DPO loss, the implicit
    rewards and the log-probs of the policy `ctx.policy` against `ctx.reference` (a `hypo.training.steps.StepContext`),
    with the run's offline loss (`configured_dpo_loss`); dropout stays off. The training cache of reference
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
            scoring = {"pad_token_id": ctx.pad_token_id, "share_prompt": ctx.share_prompt,
                       "token_weights": pair_token_weights(config, batch), "fused_lm_head": config.fused_lm_head}
            with ctx.reference.active() as ref_model:
                ref_chosen, ref_rejected = pair_logps(ref_model, batch, **scoring)  # (B,), (B,)
            chosen, rejected = pair_logps(ctx.policy, batch, **scoring)  # (B,), (B,)
            losses, chosen_rewards, rejected_rewards = configured_dpo_loss(config, batch, chosen, rejected,
                                                                           ref_chosen, ref_rejected)
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
