"""Tests of token/sequence log-probs, EOS masks and positions, against direct computations."""

import torch

from hypo.logprobs import (
    completion_per_token_logps,
    mask_after_eos,
    position_ids_from_mask,
    selective_log_softmax,
    sequence_logps,
)


def test_selective_log_softmax_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen)
    index = torch.randint(0, 11, (3, 5), generator=gen)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), expected, atol=1e-6)


def test_selective_log_softmax_is_fp32_for_half_inputs():
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    out = selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1)[..., 0]
    assert torch.allclose(out, expected, atol=1e-6)


def test_completion_logps_use_shifted_logits():
    """Prompt length 2, completion [4, 1]: token 4 is scored by logits[:, 1], token 1 by logits[:, 2]."""
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 4] = 2.0  # position 1 predicts the first completion token
    logits[0, 2, 1] = 1.0
    out = completion_per_token_logps(logits, torch.tensor([[4, 1]]), prompt_length=2)
    lse1 = torch.logsumexp(torch.tensor([0, 0, 0, 0, 2.0]), 0)
    lse2 = torch.logsumexp(torch.tensor([0, 1.0, 0, 0, 0]), 0)
    assert torch.allclose(out, torch.stack([2.0 - lse1, 1.0 - lse2]).unsqueeze(0))


def test_sequence_logps_masks_padding():
    """[-1, -2, -4] with mask [1, 1, 0] -> -3."""
    assert sequence_logps(torch.tensor([[-1.0, -2.0, -4.0]]), torch.tensor([[1, 1, 0]])).item() == -3.0


def test_mask_after_eos_keeps_first_eos_and_flags_clipped():
    eos = 2
    ids = torch.tensor([[5, 7, 2, 9, 2], [5, 7, 8, 9, 6], [2, 3, 3, 3, 3]])
    mask, clipped = mask_after_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert clipped.tolist() == [False, True, False]


def test_mask_after_eos_accepts_several_eos_ids():
    mask, clipped = mask_after_eos(torch.tensor([[5, 9, 4, 2]]), [2, 9])
    assert mask.tolist() == [[1, 1, 0, 0]] and clipped.tolist() == [False]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
