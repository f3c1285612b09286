"""Sample k completions per prompt from the current policy, cut after the first stop token and masked.

The online KL estimator needs samples from pi itself (docs/design.md: the objective). transformers fills every generation
setting that is unset (None) from the model's generation config, then from global defaults (top_k = 50), so
a config object cannot switch off what a model asks for (min_length, bad words, suppressed or forced
tokens, sequence bias, ...). Keyword arguments of `generate` are applied last, an explicit None included, so
`sampling_kwargs` passes every distribution-changing setting that way, set to neutral. Temperature and
top-p exist for the evaluation's judged completions only; the KL samples keep temperature 1, no truncation.

Stop tokens come from the model (`hypo.models.tokens.stop_token_ids`): chat models may end a turn with another
token than the tokenizer's EOS (Llama 3: `<|eot_id|>`), listed in `generation_config.eos_token_id`.

Decoding cache (`cache_implementation`, the name of TRL's GRPOConfig option): "dynamic" grows the keys and
values step by step; "static" preallocates them, and on CUDA transformers then compiles the decoding step
(torch.compile, CUDA graphs); "auto" is static on CUDA and dynamic elsewhere: on the CPU transformers does
not compile, and there the uncompiled static cache was no faster than the dynamic one (a rough measurement
on a shared 2-core machine, SmolLM2-135M, 4 prompts x 2 samples x 64 tokens: about 6 s each). A vLLM
backend would be one more value of this option.

Each prompt is prefilled once for its k samples (`shared_prompt_cache`): `generate` with
`num_return_sequences=k` repeats every prompt k times before its first forward; here the keys and values of
all prompt tokens but the last are computed once per prompt and repeated k times, and `generate` continues
from them (the distribution is the same: the same forward, on fewer rows). With the dynamic cache only: a
static cache is allocated for its G * k rows inside `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from hypo.objective.logprobs import mask_after_eos, position_ids_from_mask, selective_log_softmax

CacheImplementation = Literal["auto", "dynamic", "static"]
CACHE_IMPLEMENTATIONS = ("auto", "dynamic", "static")


@dataclass
class Completions:
    """Prompts repeated k times (rows [g * k, (g + 1) * k) share prompt g) and their completions."""

    prompt_input_ids: torch.Tensor  # (G * k, P) left-padded
    prompt_attention_mask: torch.Tensor  # (G * k, P)
    completion_ids: torch.Tensor  # (G * k, C) padded after the first stop token
    completion_mask: torch.Tensor  # (G * k, C) 1 up to and including the first stop token
    clipped: torch.Tensor  # (G * k,) bool: hit max_new_tokens without a stop token
    # (G * k, C) log-prob of each sampled token under the distribution it was drawn from (after temperature
    # and top-p), 0 after the stop; only with `return_logps=True`
    sampling_per_token_logps: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=-1)  # (G * k,)

    def rows(self, start: int, stop: int) -> Completions:
        """Rows [start, stop) as if drawn alone: prompt columns that are padding in all of them and completion
        columns after the longest of them dropped (a micro-step's share of a larger sampling call).

        Example: rows of prompt width 5 whose prompts have >= 2 pad tokens and completions <= 3 tokens long
        -> prompt width 3, completion width 3.

        Shape: (N, P), (N, C) -> (stop - start, P'), (stop - start, C') with P' <= P, C' <= C
        """
        prompt_mask = self.prompt_attention_mask[start:stop]
        first = int((prompt_mask.shape[1] - prompt_mask.sum(dim=-1)).min())  # all-padding columns on the left
        width = int(self.completion_mask[start:stop].sum(dim=-1).max())
        logps = self.sampling_per_token_logps
        return Completions(
            prompt_input_ids=self.prompt_input_ids[start:stop, first:], prompt_attention_mask=prompt_mask[:, first:],
            completion_ids=self.completion_ids[start:stop, :width], completion_mask=self.completion_mask[start:stop, :width],
            clipped=self.clipped[start:stop], sampling_per_token_logps=None if logps is None else logps[start:stop, :width])


def resolve_cache_implementation(cache_implementation: str, device: torch.device | str, *,
                                 sharded: bool = False) -> str:
    """'auto' -> 'static' on CUDA (transformers compiles its decoding step), 'dynamic' elsewhere, and 'dynamic'
    for a sharded model (FSDP2, ZeRO-3): compiled decoding and the shards' hooks do not mix (a compiled step
    around FSDP's gathers, or graphs captured on weights gathered for one call only)."""
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}")
    if cache_implementation == "auto":
        return "static" if torch.device(device).type == "cuda" and not sharded else "dynamic"
    return cache_implementation


def sampling_kwargs(
    *, max_new_tokens: int, num_return_sequences: int, eos_token_id: int | list[int], pad_token_id: int,
    temperature: float = 1.0, top_p: float = 1.0, cache_implementation: str = "dynamic",
) -> dict[str, Any]:
    """Keyword arguments of `generate` that sample from softmax(logits / temperature), nucleus-truncated only if
    top_p < 1, with every other logits processor off whatever the model's generation config says.

    None switches a processor off only as a keyword argument (see the module docstring): pass these to
    `generate(**kwargs)`, not through a GenerationConfig.
    """
    if cache_implementation not in ("dynamic", "static"):
        raise ValueError(f"cache_implementation must be 'dynamic' or 'static' here, got {cache_implementation!r}")
    return dict(
        do_sample=True, num_beams=1, temperature=temperature, top_p=top_p, top_k=0, min_p=None, top_h=None,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None, sequence_bias=None,
        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
        exponential_decay_length_penalty=None, guidance_scale=None, watermarking_config=None,
        min_length=0, min_new_tokens=None, max_new_tokens=max_new_tokens, stop_strings=None, max_time=None,
        num_return_sequences=num_return_sequences, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        renormalize_logits=False, remove_invalid_values=False, use_cache=True,
        cache_implementation=cache_implementation,
    )


@torch.no_grad()
def shared_prompt_cache(model, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                        num_generations: int):
    """The keys and values of every prompt token but the last, computed once per prompt and repeated for its
    `num_generations` rows (rows [g * k, (g + 1) * k) hold prompt g, as `generate` orders them). `generate`
    given this cache and the repeated prompts runs only their last token before decoding; that token's
    forward yields the first sample's logits.

    Shape: prompts (G, P) -> a dynamic cache of G * k rows and P - 1 positions
    """
    prefix_ids, prefix_mask = prompt_input_ids[:, :-1], prompt_attention_mask[:, :-1]  # (G, P - 1)
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids_from_mask(prefix_mask),
                use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(num_generations)  # (G, ...) -> (G * k, ...)
    return cache


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
    cache_implementation: CacheImplementation = "auto",
    return_logps: bool = False,
    prefill_once: bool = True,
) -> Completions:
    """`num_generations` samples per prompt in one batched `generate` call with a KV cache, stopping at any id of
    `eos_token_id` (pass `stop_token_ids(model, tokenizer)`). Temperature and top_p != 1 are for evaluation
    only: the KL term needs samples from the policy itself. `return_logps` also returns the sampler's own
    per-token log-probs (it keeps (G * k, C, V) scores while it runs). `prefill_once` (dynamic cache) runs
    each prompt's tokens once for its k samples instead of k times (see the module docstring).

    Shape: prompt_input_ids (G, P) left-padded -> Completions with G * k rows
    """
    from hypo.runtime.distributed import is_sharded

    kwargs = sampling_kwargs(
        max_new_tokens=max_new_tokens, num_return_sequences=num_generations, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, temperature=temperature, top_p=top_p,
        cache_implementation=resolve_cache_implementation(cache_implementation, prompt_input_ids.device,
                                                          sharded=is_sharded(model)),
    )
    if return_logps:
        kwargs.update(return_dict_in_generate=True, output_scores=True)
    input_ids, attention_mask = prompt_input_ids, prompt_attention_mask
    was_training = model.training
    model.eval()
    try:
        if prefill_once and num_generations > 1 and kwargs["cache_implementation"] == "dynamic" \
                and prompt_input_ids.shape[1] > 1:
            kwargs.update(cache=shared_prompt_cache(model, prompt_input_ids, prompt_attention_mask, num_generations),
                          cache_implementation=None, num_return_sequences=1)
            input_ids = prompt_input_ids.repeat_interleave(num_generations, dim=0)  # (G * k, P)
            attention_mask = prompt_attention_mask.repeat_interleave(num_generations, dim=0)  # (G * k, P)
        # synced_gpus=False: generation is local; sharded weights are gathered first (hypo.runtime.distributed)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=False, **kwargs)
    finally:
        model.train(was_training)
    sequences = output.sequences if return_logps else output  # (G * k, P + C)
    prompt_length = prompt_input_ids.shape[1]
    completion_ids = sequences[:, prompt_length:]  # (G * k, C)
    completion_mask, clipped = mask_after_eos(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    sampling_logps = None
    if return_logps:
        scores = torch.stack(output.scores, dim=1)  # (G * k, C, V): the logits the tokens were drawn from
        sampling_logps = selective_log_softmax(scores, completion_ids).masked_fill(completion_mask == 0, 0.0)
    return Completions(
        prompt_input_ids=prompt_input_ids.repeat_interleave(num_generations, dim=0),
        prompt_attention_mask=prompt_attention_mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        clipped=clipped,
        sampling_per_token_logps=sampling_logps,
    )
