"""Token and sequence log-probabilities from logits; completion masks and EOS truncation.

Pure torch. Conventions: `per_token_logps` are log pi(token_t | tokens_<t) for completion tokens,
`logps` are their sums over the completion (DESIGN section 2), `*_mask` are 0/1 tensors.
"""

from __future__ import annotations

import torch


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] in fp32, one row at a time so that no extra (B, T, V) tensor lives
    beside the logits.

    Shape: logits (B, T, V), index (B, T) -> (B, T)
    """
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):  # (T, V), (T,)
        row_logits = row_logits.float()
        token_logits = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(token_logits - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs over the completion, padding masked out.

    Shape: per_token_logps (B, C), mask (B, C) -> (B,)
    """
    return (per_token_logps * mask).sum(dim=-1)


def mask_after_eos(completion_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask that keeps each completion up to and including its first EOS, and which rows never hit EOS.

    Example: ids [5, 7, EOS, 9, EOS] -> mask [1, 1, 1, 0, 0]; ids [5, 7, 8] -> mask [1, 1, 1], clipped.

    Shape: completion_ids (B, C) -> mask (B, C) long, clipped (B,) bool
    """
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos_ids)  # (B, C)
    clipped = ~is_eos.any(dim=-1)  # (B,)
    first_eos = torch.where(clipped, completion_ids.shape[1], is_eos.int().argmax(dim=-1))  # (B,)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)  # (C,)
    mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()  # (B, C)
    return mask, clipped


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them, so scoring matches sampling.

    Shape: (B, T) -> (B, T)
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def completion_logps(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Sequence log-probs of right-padded completions after left-padded prompts, in one forward pass.

    Positions skip the left padding (as in `generate`), and the output layer runs only on the
    completion positions (`logits_to_keep`).

    Shape: prompts (B, P), completions (B, C) -> (B,)
    """
    input_ids = torch.cat([prompt_input_ids, completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([prompt_attention_mask, completion_mask], dim=1)  # (B, P + C)
    completion_length = completion_ids.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=completion_length + 1,
        use_cache=False,
    ).logits[:, :-1]  # (B, C, V): position P - 1 + t predicts completion token t
    per_token_logps = selective_log_softmax(logits, completion_ids)  # (B, C)
    return sequence_logps(per_token_logps, completion_mask)
