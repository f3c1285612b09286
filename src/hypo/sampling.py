"""Sample k completions per prompt from the current policy, EOS-truncated and masked.

The online KL estimator needs samples from pi itself (DESIGN section 2), so every setting that would
reshape the distribution (top-k, top-p, repetition penalties, a model's own generation defaults) is
set to neutral explicitly: transformers fills unset fields from the model's generation config and
from global defaults (top_k = 50).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypo.logprobs import mask_after_eos


@dataclass
class Completions:
    """Prompts repeated k times (rows [g * k, (g + 1) * k) share prompt g) and their completions."""

    prompt_input_ids: torch.Tensor  # (G * k, P) left-padded
    prompt_attention_mask: torch.Tensor  # (G * k, P)
    completion_ids: torch.Tensor  # (G * k, C) padded after the first EOS
    completion_mask: torch.Tensor  # (G * k, C) 1 up to and including the first EOS
    clipped: torch.Tensor  # (G * k,) bool: hit max_new_tokens without EOS

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=-1)  # (G * k,)


def sampling_config(
    *, max_new_tokens: int, num_return_sequences: int, eos_token_id, pad_token_id: int,
    temperature: float = 1.0, top_p: float = 1.0,
):
    """A GenerationConfig that samples from softmax(logits / temperature), nucleus-truncated only if
    top_p < 1, with every other logits processor off."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, num_beams=1, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
        renormalize_logits=False, remove_invalid_values=False,
    )


@torch.no_grad()
def generate_completions(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Completions:
    """`num_generations` samples per prompt in one batched `generate` call with a KV cache.

    Shape: prompt_input_ids (G, P) left-padded -> Completions with G * k rows
    """
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            generation_config=sampling_config(
                max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, temperature=temperature, top_p=top_p,
            ),
            synced_gpus=False,  # local: sharded weights are gathered first (hypo.distributed)
        )  # (G * k, P + C)
    finally:
        model.train(was_training)
    prompt_length = prompt_input_ids.shape[1]
    completion_ids = output[:, prompt_length:]  # (G * k, C)
    completion_mask, clipped = mask_after_eos(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    return Completions(
        prompt_input_ids=prompt_input_ids.repeat_interleave(num_generations, dim=0),
        prompt_attention_mask=prompt_attention_mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        clipped=clipped,
    )
