"""What vLLM is asked and what it answers, without vLLM: neutral sampling parameters, requests, and the
checked conversion of its samples into `hypo.sampling.generate.Completions` (the rows, padding and masks
`generate_completions` gives), so the loop can swap backends.

The KL term needs exact draws from the current policy (docs/design.md: the objective), so every request switches
off what could change the distribution, whatever the model's generation config or the server's defaults say:
temperature 1, top_p 1, top_k 0, min_p 0, no repetition / presence / frequency penalty, no minimum length, no
logit bias, no bad words; it stops at every stop id of the model (`hypo.models.tokens.stop_token_ids`) and after
`max_completion_length` tokens. `sampling_per_token_logps` holds vLLM's own log-probs of the sampled tokens, for
parity checks only: the KL surrogate always uses our forward's log-probs.
"""

from __future__ import annotations

from typing import Any

import torch

from hypo.sampling.generate import Completions


class VLLMServerError(RuntimeError):
    """The vLLM server could not be used: the message names its URL and what failed."""


class VLLMSampleError(RuntimeError):
    """vLLM returned samples that are not draws from the policy as asked (wrong stop, length or shape)."""


def neutral_sampling_params(*, num_generations: int, max_tokens: int, stop_token_ids: list[int]) -> dict[str, Any]:
    """vLLM sampling parameters that draw from softmax(logits) itself, with the sampled tokens' log-probs.

    Each distribution-changing field is set explicitly: a field left out would take the server's default,
    which `--generation-config auto` (vLLM's default) fills from the model's generation_config.json.
    `logprobs=0` returns the log-prob of each sampled token only.
    """
    return dict(
        n=num_generations, max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
        repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0,
        stop_token_ids=list(stop_token_ids), ignore_eos=False, logprobs=0, skip_special_tokens=False,
    )


def completion_request(prompts: list[list[int]], *, model: str, num_generations: int, max_tokens: int,
                       stop_token_ids: list[int]) -> dict[str, Any]:
    """Body of `POST /v1/completions`: token-id prompts in, token ids and their log-probs out."""
    return dict(model=model, prompt=prompts, stream=False, return_token_ids=True, logit_bias=None, bad_words=[],
                allowed_token_ids=None, stop=[],
                **neutral_sampling_params(num_generations=num_generations, max_tokens=max_tokens,
                                          stop_token_ids=stop_token_ids))


def prompt_token_lists(prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[list[int]]:
    """The prompts without their left padding.

    Shape: (G, P) -> G lists
    """
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_input_ids, prompt_attention_mask, strict=True)]


@torch.no_grad()
def per_token_logp_gap(model, samples: Completions) -> tuple[float, float]:
    """Largest and mean |our per-token log-prob - the engine's| over the completion tokens of `samples` (which
    must carry `sampling_per_token_logps`): near float rounding when the engine holds `model`'s weights."""
    from hypo.objective.logprobs import completion_per_token_logps

    ours = completion_per_token_logps(model, samples.prompt_input_ids, samples.prompt_attention_mask,
                                      samples.completion_ids, samples.completion_mask)  # (N, C)
    gap = (ours - samples.sampling_per_token_logps.to(ours.device)).abs() * samples.completion_mask  # (N, C)
    return gap.max().item(), (gap.sum() / samples.completion_mask.sum()).item()


def completions_from_samples(
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    samples: list[tuple[list[int], list[float]]],
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
) -> Completions:
    """`Completions` from sampled token ids and their log-probs, rows [g * k, (g + 1) * k) for prompt g, padded
    to the longest row as `generate_completions` pads them.

    Each row must end at its first stop id, or run `max_new_tokens` tokens without one; anything else (a stop
    id inside a row, a row that ends early on another token, a log-prob per token missing) is a
    `VLLMSampleError`: those samples would not be the policy's.

    Shape: prompts (G, P), G * k samples -> Completions with G * k rows, C = longest sample
    """
    num_prompts = prompt_input_ids.shape[0]
    if len(samples) != num_prompts * num_generations:
        raise VLLMSampleError(f"expected {num_prompts} prompts x {num_generations} samples = "
                              f"{num_prompts * num_generations} completions, got {len(samples)}")
    stop_ids = set(torch.as_tensor(eos_token_id).reshape(-1).tolist())
    for row, (token_ids, logps) in enumerate(samples):
        if not token_ids or len(logps) != len(token_ids):
            raise VLLMSampleError(f"row {row}: {len(token_ids)} tokens with {len(logps)} log-probs")
        stops = [i for i, token in enumerate(token_ids) if token in stop_ids]
        if stops and stops[0] != len(token_ids) - 1:
            raise VLLMSampleError(f"row {row}: stop id {token_ids[stops[0]]} at position {stops[0]} but the sample "
                                  f"goes on to {len(token_ids)} tokens (stop_token_ids ignored?)")
        if not stops and len(token_ids) != max_new_tokens:
            raise VLLMSampleError(
                f"row {row}: ended after {len(token_ids)} tokens on id {token_ids[-1]}, which is no stop id of the "
                f"policy {sorted(stop_ids)} (max {max_new_tokens}): the server's model or its stop ids differ")
        if len(token_ids) > max_new_tokens:
            raise VLLMSampleError(f"row {row}: {len(token_ids)} tokens, more than max_tokens={max_new_tokens}")
    width = max(len(token_ids) for token_ids, _ in samples)
    device = prompt_input_ids.device
    completion_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long, device=device)  # (G * k, C)
    completion_mask = torch.zeros((len(samples), width), dtype=torch.long, device=device)  # (G * k, C)
    sampling_logps = torch.zeros((len(samples), width), dtype=torch.float32, device=device)  # (G * k, C)
    clipped = torch.zeros(len(samples), dtype=torch.bool, device=device)  # (G * k,)
    for row, (token_ids, logps) in enumerate(samples):
        n = len(token_ids)
        completion_ids[row, :n] = torch.tensor(token_ids, dtype=torch.long)
        completion_mask[row, :n] = 1
        sampling_logps[row, :n] = torch.tensor([float("nan") if v is None else v for v in logps])
        clipped[row] = token_ids[-1] not in stop_ids
    if not torch.isfinite(sampling_logps).all():
        raise VLLMSampleError("vLLM returned a missing or non-finite log-prob for a sampled token")
    return Completions(
        prompt_input_ids=prompt_input_ids.repeat_interleave(num_generations, dim=0),
        prompt_attention_mask=prompt_attention_mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids, completion_mask=completion_mask, clipped=clipped,
        sampling_per_token_logps=sampling_logps,
    )


def samples_from_completion_response(response: dict[str, Any], prompts: list[list[int]],
                                     num_generations: int) -> list[tuple[list[int], list[float]]]:
    """(token ids, log-probs) per choice of an OpenAI-style completion answer with `return_token_ids`, in the
    order prompt 0 sample 0..k-1, prompt 1 ...; each choice's prompt must be the one asked for."""
    choices = sorted(response["choices"], key=lambda choice: choice["index"])
    if len(choices) != len(prompts) * num_generations:
        raise VLLMSampleError(f"asked for {len(prompts)} prompts x {num_generations} samples, got {len(choices)} "
                              "completions")
    samples = []
    for i, choice in enumerate(choices):
        prompt = prompts[i // num_generations]
        if choice.get("prompt_token_ids") is not None and list(choice["prompt_token_ids"]) != prompt:
            raise VLLMSampleError(f"completion {i} continues another prompt than prompt {i // num_generations}")
        token_ids = choice.get("token_ids")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if token_ids is None or logprobs is None:
            raise VLLMSampleError(f"completion {i} has no token_ids or no token_logprobs (a vLLM server older than "
                                  "0.10, or not vLLM?)")
        samples.append((list(token_ids), list(logprobs)))
    return samples


