"""The sampler must draw from the policy itself: no top-k, no penalties, whatever the model's own
generation defaults say; completions are cut after their first EOS."""

import torch

from conftest import build_model
from hypo.sampling import generate_completions


def _prompt(tokenizer, text="Write a short review of a cafe."):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return ids, torch.ones_like(ids)


def test_samples_cover_the_whole_vocabulary_despite_model_defaults(tiny_tokenizer):
    """Uniform next-token distribution over V = 320 tokens; 4000 draws see every token with probability
    ~0.99 (expected unseen 320 * (1 - 1/320)^4000 = 0.001). The model's generation config asks for
    top_k = 5 and a repetition penalty: a sampler that honoured them would see at most 5 tokens."""
    model = build_model(tiny_tokenizer, tie_word_embeddings=False)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all 0 -> uniform
    model.generation_config.top_k = 5
    model.generation_config.repetition_penalty = 3.0
    ids, mask = _prompt(tiny_tokenizer)
    torch.manual_seed(0)
    out = generate_completions(model, ids, mask, num_generations=4000, max_new_tokens=1,
                               eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    assert out.completion_ids.shape == (4000, 1)
    assert len(set(out.completion_ids[:, 0].tolist())) >= len(tiny_tokenizer) - 2


def test_first_token_frequencies_match_softmax(tiny_tokenizer):
    """Empirical first-token frequencies over 20000 draws match softmax(logits) (total variation < 0.07;
    sampling noise alone gives about 0.04 here, while top-k 50 would drop ~40% of the mass)."""
    model = build_model(tiny_tokenizer, seed=3, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # a non-uniform distribution: top-50 mass 0.6
    model.generation_config.min_p = 0.5  # a default the sampler must ignore: it would cut the tail
    ids, mask = _prompt(tiny_tokenizer)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits[0, -1].float(), dim=-1)
    torch.manual_seed(1)
    out = generate_completions(model, ids, mask, num_generations=20000, max_new_tokens=1,
                               eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    counts = torch.bincount(out.completion_ids[:, 0], minlength=probs.numel()).float()
    tv = 0.5 * (counts / counts.sum() - probs).abs().sum().item()
    top50_mass = probs.topk(50).values.sum().item()
    assert tv < 0.07, tv
    assert top50_mass < 0.7  # the check above would catch a top-k sampler


def test_rows_group_by_prompt_and_mask_after_eos(tiny_tokenizer):
    """Rows [g*k, (g+1)*k) repeat prompt g; after the first EOS ids are pad and mask is 0."""
    model = build_model(tiny_tokenizer, tie_word_embeddings=False)
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():  # EOS gets 1/5 of the mass: some rows stop early, about 1 in 4 is clipped
        model.lm_head.weight.zero_()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tiny_tokenizer)))
    with torch.no_grad():
        model.lm_head.bias[eos] = torch.log(torch.tensor(0.25 * (len(tiny_tokenizer) - 1)))
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    torch.manual_seed(0)
    out = generate_completions(model, ids, mask, num_generations=10, max_new_tokens=6, eos_token_id=eos,
                               pad_token_id=tiny_tokenizer.pad_token_id)
    assert torch.equal(out.prompt_input_ids, ids.repeat_interleave(10, dim=0))
    assert torch.equal(out.prompt_attention_mask, mask.repeat_interleave(10, dim=0))
    for row, row_mask, clipped in zip(out.completion_ids, out.completion_mask, out.clipped, strict=True):
        n = int(row_mask.sum())
        assert row_mask[:n].eq(1).all() and row_mask[n:].eq(0).all()
        assert bool(clipped) == (eos not in row[:n].tolist())
        if not clipped:
            assert row[n - 1] == eos and (row[:n - 1] != eos).all()
    assert torch.equal(out.lengths, out.completion_mask.sum(-1))
    assert 0 < int(out.clipped.sum()) < len(out.clipped)


def test_generation_restores_training_mode(tiny_tokenizer):
    model = build_model(tiny_tokenizer).train()
    ids, mask = _prompt(tiny_tokenizer)
    generate_completions(model, ids, mask, num_generations=2, max_new_tokens=2,
                         eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    assert model.training
