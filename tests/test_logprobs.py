"""Tests of token/sequence log-probs, EOS masks and positions, against direct computations."""

import pytest
import torch

from conftest import build_model
from hypo.objective.logprobs import (
    completion_logps,
    completion_per_token_logps,
    mask_after_eos,
    pair_logps,
    position_ids_from_mask,
    selective_log_softmax,
    sequence_logps,
    shared_prompt_logps,
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


def test_completion_logps_match_an_unpadded_forward(tiny_tokenizer):
    """Left-padded prompts and right-padded completions give the same sequence log-probs as scoring each
    sequence alone: positions skip the padding, and token t is scored by the logits at t - 1."""
    model = build_model(tiny_tokenizer, seed=2)
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11], [12, 13, 14]]
    pad = tiny_tokenizer.pad_token_id
    prompt_ids = torch.tensor([[5, 6, 7], [pad, 8, 9]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    completion_ids = torch.tensor([[10, 11, pad], [12, 13, 14]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        got = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        expected = []
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)  # (T, V)
            expected.append(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


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


@pytest.mark.parametrize("layout", ["pairs", "samples"])
@pytest.mark.parametrize("completion_length", [1, 5])
def test_shared_prompt_logps_equal_repeated_prompts_values_and_gradients(tiny_tokenizer, layout, completion_length):
    """Each prompt run once against its cached keys/values gives the log-probs and gradients of the plain
    forward over repeated prompts: left-padded prompts, completions padded after an early end."""
    model = build_model(tiny_tokenizer, seed=0).train()
    gen = torch.Generator().manual_seed(0)
    num_prompts, prompt_length, pad = 3, 7, tiny_tokenizer.pad_token_id
    prompt_mask = torch.ones(num_prompts, prompt_length, dtype=torch.long)
    prompt_mask[0, :3], prompt_mask[2, :1] = 0, 0
    prompts = torch.randint(5, 300, (num_prompts, prompt_length), generator=gen).masked_fill(prompt_mask == 0, pad)
    rows = torch.arange(num_prompts)
    index = rows.repeat(2) if layout == "pairs" else rows.repeat_interleave(2)  # chosen/rejected or k = 2
    completion_mask = torch.ones(len(index), completion_length, dtype=torch.long)
    completion_mask[1, completion_length // 2 + 1:] = 0
    completions = torch.randint(5, 300, completion_mask.shape, generator=gen).masked_fill(completion_mask == 0, pad)

    plain = completion_logps(model, prompts[index], prompt_mask[index], completions, completion_mask)
    plain_grads = torch.autograd.grad(plain.sum(), list(model.parameters()))
    shared = shared_prompt_logps(model, prompts, prompt_mask, index, completions, completion_mask)
    shared_grads = torch.autograd.grad(shared.sum(), list(model.parameters()))

    assert plain.shape == (2 * num_prompts,) and (plain < 0).all()
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_pair_logps_with_token_weights_are_the_weighted_sums(tiny_tokenizer, share_prompt):
    """With token_weights each pair's log-prob is sum_t w_t * log pi(token_t), on both scoring paths: weights
    [1, 0.5, 0.25, ...] against the per-token log-probs of a plain forward."""
    from hypo.data.batches import PairCollator

    model, gen = build_model(tiny_tokenizer, seed=0), torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 300, (n,), generator=gen).tolist()

    items = [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r), "index": i}
             for i, (p, c, r) in enumerate([(3, 4, 2), (5, 2, 5)])]
    batch = PairCollator(tiny_tokenizer.pad_token_id)(items)
    weights = tuple(batch[f"{side}_attention_mask"] * 0.5 ** torch.arange(batch[f"{side}_input_ids"].shape[1])
                    for side in ("chosen", "rejected"))
    with torch.no_grad():
        chosen, rejected = pair_logps(model, batch, pad_token_id=tiny_tokenizer.pad_token_id,
                                      share_prompt=share_prompt, token_weights=weights)
        for side, got, weight in (("chosen", chosen, weights[0]), ("rejected", rejected, weights[1])):
            per_token = completion_per_token_logps(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                                   batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
            torch.testing.assert_close(got, (per_token * weight).sum(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fused_output_layer_gives_the_plain_values_and_gradients(tiny_tokenizer, tied):
    """TRL's fused output layer (no logits materialized) gives the plain forward's per-token log-probs and
    gradients: left-padded prompts, completions padded after an early end."""
    pytest.importorskip("trl")
    from hypo.models.loading import add_fused_lm_head
    from hypo.objective.logprobs import completion_per_token_logps

    plain_model = build_model(tiny_tokenizer, seed=0, tie_word_embeddings=tied).train()
    fused_model = build_model(tiny_tokenizer, seed=0, tie_word_embeddings=tied).train()
    add_fused_lm_head(fused_model)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, 300, (3, 6), generator=gen)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[0, :2] = 0
    completions = torch.randint(5, 300, (3, 7), generator=gen)
    completion_mask = torch.ones_like(completions)
    completion_mask[1, 4:] = 0
    plain = completion_per_token_logps(plain_model, prompts, prompt_mask, completions, completion_mask)
    fused = completion_per_token_logps(fused_model, prompts, prompt_mask, completions, completion_mask,
                                       fused_lm_head=True)
    torch.testing.assert_close(fused * completion_mask, plain * completion_mask, rtol=1e-5, atol=1e-5)
    (plain * completion_mask).sum().backward()
    (fused * completion_mask).sum().backward()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # without the flag the model is its own forward (generation is unchanged)
        torch.testing.assert_close(fused_model(input_ids=prompts).logits, plain_model(input_ids=prompts).logits)


def test_fused_output_layer_keeps_no_logits_for_the_backward(tiny_tokenizer):
    """The bytes saved for the backward with a 20,000-word vocabulary: the plain path keeps the float32 logits
    of every scored position (3 rows x 8 positions x 20,000 x 4 bytes = 1.9 MB), the fused one none of them."""
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM

    from hypo.models.loading import add_fused_lm_head
    from hypo.objective.logprobs import completion_per_token_logps

    def saved(fused: bool) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=20000, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        if fused:
            add_fused_lm_head(model)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, 20000, (3, 8))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            completion_per_token_logps(model, ids, torch.ones_like(ids), ids, torch.ones_like(ids), fused_lm_head=fused)
        return sum(seen.values())

    plain, fused = saved(False), saved(True)
    assert plain - fused > 3 * 8 * 20000 * 4 and fused < plain / 10  # measured: 2.29 MB and 0.13 MB
