"""Token and sequence log-probabilities from logits; completion masks and EOS truncation.

Pure torch. Conventions: `per_token_logps` are log pi(token_t | tokens_<t) for completion tokens,
`logps` are their sums over the completion (docs/design.md: the objective), `*_mask` are 0/1 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Mask that keeps each completion up to and including its first stop token (any id of `eos_token_id`),
    and which rows have none (clipped at the length limit).

    Example: ids [5, 7, EOS, 9, EOS] -> mask [1, 1, 1, 0, 0]; ids [5, 7, 8] -> mask [1, 1, 1], clipped;
    stop ids [2, 9]: ids [5, 9, 4, 2] -> mask [1, 1, 0, 0].

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


def completion_per_token_logps(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    fused_lm_head: bool = False,
) -> torch.Tensor:
    """Per-token log-probs of right-padded completions after left-padded prompts, in one forward pass
    (padding positions hold the log-prob of the pad id, or 0 with `fused_lm_head`; mask them).

    Positions skip the left padding (as in `generate`), and the output layer runs only on the
    completion positions (`logits_to_keep`). With `fused_lm_head` (a model given TRL's fused output layer,
    `hypo.models.loading.add_fused_lm_head`) no logits are made: the model returns the log-probs of the
    labels, the completion tokens, computed tile by tile in float32.

    Shape: prompts (B, P), completions (B, C) -> (B, C)
    """
    input_ids = torch.cat([prompt_input_ids, completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([prompt_attention_mask, completion_mask], dim=1)  # (B, P + C)
    completion_length = completion_ids.shape[1]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids_from_mask(attention_mask), "use_cache": False}
    if fused_lm_head:
        labels = torch.cat([torch.full_like(prompt_input_ids, -100),
                            completion_ids.masked_fill(completion_mask == 0, -100)], dim=1)  # (B, P + C)
        # (B, P + C - 1): position t scores label t + 1; the last C are the completion tokens
        return model(**inputs, labels=labels, fused_lm_head=True).log_probs[:, -completion_length:]  # (B, C)
    logits = model(**inputs, logits_to_keep=completion_length + 1).logits[:, :-1]
    # (B, C, V): position P - 1 + t predicts completion token t
    return selective_log_softmax(logits, completion_ids)  # (B, C)


def completion_logps(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    fused_lm_head: bool = False,
) -> torch.Tensor:
    """Sequence log-probs of right-padded completions after left-padded prompts (`completion_per_token_logps`
    summed over the mask, or weighted by `token_weights`, (B, C), zero on padding).

    Shape: prompts (B, P), completions (B, C) -> (B,)
    """
    per_token_logps = completion_per_token_logps(
        model, prompt_input_ids, prompt_attention_mask, completion_ids, completion_mask,
        fused_lm_head=fused_lm_head)  # (B, C)
    return sequence_logps(per_token_logps, completion_mask if token_weights is None else token_weights)


def shared_prompt_logps(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence log-probs of completions that share prompts, each prompt run once (weighted sums with
    `token_weights`, as in `completion_logps`).

    Completion row i continues prompt row `prompt_index[i]` (chosen and rejected share a prompt; so do
    the k samples of a prompt). A first forward runs the G prompts and keeps their keys and values; a
    second runs the N completions against those, selected per row. Same values as `completion_logps`
    on the repeated prompts (up to float rounding), gradients included, with the prompt tokens computed
    G times instead of N.

    Shape: prompts (G, P), prompt_index (N,) in [0, G), completions (N, C) -> (N,)
    """
    prompt_length, completion_length = prompt_input_ids.shape[1], completion_ids.shape[1]
    attention_mask = torch.cat([prompt_attention_mask[prompt_index], completion_mask], dim=1)  # (N, P + C)
    positions = position_ids_from_mask(attention_mask)  # (N, P + C), as in completion_logps
    prompt_out = model(
        input_ids=prompt_input_ids,
        attention_mask=prompt_attention_mask,
        position_ids=position_ids_from_mask(prompt_attention_mask),
        logits_to_keep=1,
        use_cache=True,
    )
    logits = prompt_out.logits[prompt_index]  # (N, 1, V): the last prompt position predicts completion token 0
    if completion_length > 1:
        cache = prompt_out.cache
        cache.reorder_cache(prompt_index)  # (G, ...) -> (N, ...) rows, differentiable
        completion_logits = model(
            input_ids=completion_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, prompt_length:-1],
            cache=cache,
            use_cache=True,
        ).logits  # (N, C - 1, V): completion position t predicts completion token t + 1
        logits = torch.cat([logits, completion_logits], dim=1)  # (N, C, V)
    per_token_logps = selective_log_softmax(logits, completion_ids)  # (N, C)
    return sequence_logps(per_token_logps, completion_mask if token_weights is None else token_weights)


def grouped_completion_logps(model, prompt_input_ids, prompt_attention_mask, prompt_index, completion_ids,
                             completion_mask, *, share_prompt: bool, token_weights=None,
                             fused_lm_head: bool = False) -> torch.Tensor:
    """Log-probs of completions whose prompts are rows `prompt_index` of the prompt batch: each prompt
    run once (`share_prompt`) or repeated per completion (one forward over full rows, through TRL's fused
    output layer with `fused_lm_head`).

    Shape: prompts (G, P), prompt_index (N,), completions (N, C) -> (N,)
    """
    if share_prompt:
        return shared_prompt_logps(model, prompt_input_ids, prompt_attention_mask, prompt_index, completion_ids,
                                   completion_mask, token_weights)
    return completion_logps(model, prompt_input_ids[prompt_index], prompt_attention_mask[prompt_index],
                            completion_ids, completion_mask, token_weights, fused_lm_head=fused_lm_head)


def _pad_right(ids: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(ids, (0, width - ids.shape[1]), value=value)


def pair_logps(model, batch: dict[str, torch.Tensor], *, pad_token_id: int, share_prompt: bool,
               token_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
               fused_lm_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs in one pass over 2B completion rows; `token_weights` (chosen (B, C),
    rejected (B, R)) weight each token in the sums (`hypo.objective.pair_losses.ld_token_weights`);
    `fused_lm_head`: through TRL's fused output layer (no full logits).

    Shape: batch of B pairs -> chosen (B,), rejected (B,)
    """
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    completion_ids = torch.cat([_pad_right(batch["chosen_input_ids"], width, pad_token_id),
                                _pad_right(batch["rejected_input_ids"], width, pad_token_id)])  # (2B, C)
    completion_mask = torch.cat([_pad_right(batch["chosen_attention_mask"], width, 0),
                                 _pad_right(batch["rejected_attention_mask"], width, 0)])  # (2B, C)
    num_pairs = batch["prompt_input_ids"].shape[0]
    prompt_index = torch.arange(num_pairs, device=completion_ids.device).repeat(2)  # (2B,): chosen rows, rejected
    if token_weights is not None:
        token_weights = torch.cat([_pad_right(weights, width, 0) for weights in token_weights])  # (2B, C)
    logps = grouped_completion_logps(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                     prompt_index, completion_ids, completion_mask, share_prompt=share_prompt,
                                     token_weights=token_weights, fused_lm_head=fused_lm_head)
    return logps.chunk(2)
