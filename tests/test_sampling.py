"""The sampler must draw from the policy itself: no top-k, no penalties, whatever the model's own
generation defaults say, with either decoding cache; completions are cut after their first stop token, and
the stop tokens come from the model's generation config as well as the tokenizer."""

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import build_model
from hypo.models.tokens import stop_token_ids
from hypo.objective.logprobs import completion_logps, completion_per_token_logps
from hypo.sampling.generate import generate_completions, resolve_cache_implementation

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def test_stop_token_ids_join_the_model_and_tokenizer_eos():
    """Llama 3 Instruct: generation_config.eos_token_id [128001, 128008, 128009], tokenizer EOS 128009."""
    def model(eos):
        return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))

    tokenizer = SimpleNamespace(eos_token_id=128009)
    assert stop_token_ids(model([128001, 128008, 128009]), tokenizer) == [128001, 128008, 128009]
    assert stop_token_ids(model(128001), tokenizer) == [128001, 128009]
    assert stop_token_ids(model(None), tokenizer) == [128009]
    assert stop_token_ids(SimpleNamespace(), tokenizer) == [128009]
    with pytest.raises(ValueError, match="no stop token"):
        stop_token_ids(model(None), SimpleNamespace(eos_token_id=None))


def _two_stop_model(tokenizer, other: int):
    """Uniform logits except: the tokenizer's EOS and `other` (a second id in generation_config.eos_token_id)
    get 1/8 of the mass each, so rows end at either, and about (3/4)^6 = 18% run 6 tokens without a stop."""
    model = build_model(tokenizer, tie_word_embeddings=False)
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    model.generation_config.eos_token_id = [eos, other]
    model.lm_head.weight.data.zero_()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(vocab))
    model.lm_head.bias.data[[eos, other]] = torch.log(torch.tensor((vocab - 2) / 6.0))  # 1/8 each
    return model


def test_samples_stop_at_any_stop_token_of_the_model(tiny_tokenizer):
    """Rows end at the first of EOS or the model's second stop id, masked after it; clipped rows have neither.
    A sampler that stopped at the tokenizer's EOS only would run on after `other` (4 in 5 rows hold one)."""
    other, eos = 100, tiny_tokenizer.eos_token_id
    model = _two_stop_model(tiny_tokenizer, other)
    stops = stop_token_ids(model, tiny_tokenizer)
    assert stops == [eos, other]
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    torch.manual_seed(0)
    out = generate_completions(model, ids, mask, num_generations=40, max_new_tokens=6, eos_token_id=stops,
                               pad_token_id=tiny_tokenizer.pad_token_id)
    last_tokens = []
    for row, row_mask, clipped in zip(out.completion_ids, out.completion_mask, out.clipped, strict=True):
        n = int(row_mask.sum())
        assert row_mask[:n].eq(1).all() and row_mask[n:].eq(0).all()
        assert (row[n:] == tiny_tokenizer.pad_token_id).all()
        assert not any(t in stops for t in row[:n - 1].tolist())  # no stop token before the last kept one
        assert bool(clipped) == (row[n - 1].item() not in stops) and (n == 6 or not clipped)
        last_tokens.append(row[n - 1].item())
    assert last_tokens.count(other) > 10 and last_tokens.count(eos) > 10  # both stop ids end rows
    assert 0 < int(out.clipped.sum()) < 40  # completions/clipped_ratio counts rows without any stop id


def test_auto_cache_is_static_on_cuda_only():
    assert resolve_cache_implementation("auto", "cpu") == "dynamic"
    assert resolve_cache_implementation("auto", "cuda:0") == "static"
    assert resolve_cache_implementation("auto", "cuda:0", sharded=True) == "dynamic"  # FSDP2 / ZeRO-3: no compile
    assert resolve_cache_implementation("static", "cuda:0", sharded=True) == "static"  # asked for: kept
    assert resolve_cache_implementation("static", "cpu") == "static"
    with pytest.raises(ValueError, match="cache_implementation"):
        resolve_cache_implementation("paged", "cpu")


def _model_with_distorting_defaults(tokenizer, device):
    """A model whose generation config asks for every logits processor that reshapes the distribution."""
    model = build_model(tokenizer, seed=3, tie_word_embeddings=False).to(device)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked distribution: the processors below would change it
    config = model.generation_config
    config.eos_token_id = [tokenizer.eos_token_id, 100]
    for name, value in dict(
        top_k=5, top_p=0.5, min_p=0.2, typical_p=0.5, epsilon_cutoff=0.01, eta_cutoff=0.01, temperature=0.5,
        repetition_penalty=3.0, no_repeat_ngram_size=1, min_length=40, min_new_tokens=3, bad_words_ids=[[7]],
        suppress_tokens=[8], begin_suppress_tokens=[9], sequence_bias={(10,): 5.0}, forced_eos_token_id=11,
        exponential_decay_length_penalty=(1, 2.0), renormalize_logits=True, max_time=1e-9,
        cache_implementation="static" if device == "cpu" else "dynamic",
    ).items():
        setattr(config, name, value)
    return model


def _prompts(tokenizer, device):
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad, pad, 5, 6, 7], [8, 9, 10, 11, 12]], device=device)
    return ids, (ids != pad).long()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_sampled_tokens_are_exact_draws_from_the_policy(tiny_tokenizer, cache_implementation, device):
    """The log-prob of each sampled token under the distribution `generate` drew it from (its processed scores)
    equals the policy's own log-prob from one forward pass (`hypo.objective.logprobs`), to 1e-5, with either cache and
    left-padded prompts, while the model's generation config asks for top-k 5, a repetition penalty, a
    minimum length, suppressed and forced tokens, ...: any of those would move these log-probs."""
    model = _model_with_distorting_defaults(tiny_tokenizer, device)
    ids, mask = _prompts(tiny_tokenizer, device)
    torch.manual_seed(0)
    out = generate_completions(model, ids, mask, num_generations=4, max_new_tokens=8,
                               eos_token_id=stop_token_ids(model, tiny_tokenizer),
                               pad_token_id=tiny_tokenizer.pad_token_id, cache_implementation=cache_implementation,
                               return_logps=True)
    with torch.no_grad():
        forward = completion_per_token_logps(model, out.prompt_input_ids, out.prompt_attention_mask,
                                             out.completion_ids, out.completion_mask) * out.completion_mask
    assert out.sampling_per_token_logps.shape == out.completion_ids.shape == (8, 8)
    assert torch.isfinite(out.sampling_per_token_logps).all()
    torch.testing.assert_close(out.sampling_per_token_logps, forward, rtol=0, atol=1e-5)
    assert (forward.sum(-1) < -0.1).all()  # not trivially certain tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_next_samples_use_the_weights_after_an_optimizer_step(tiny_tokenizer, cache_implementation, device):
    """Training updates the weights in place between `generate` calls; the next samples must come from the
    updated policy: their sampler log-probs equal a fresh forward of the updated model and differ from the
    old model's. (On CUDA the static cache runs a compiled decoding step that must not keep stale weights.)"""
    model = build_model(tiny_tokenizer, seed=4).to(device)
    ids, mask = _prompts(tiny_tokenizer, device)
    kwargs = dict(num_generations=4, max_new_tokens=6, eos_token_id=stop_token_ids(model, tiny_tokenizer),
                  pad_token_id=tiny_tokenizer.pad_token_id, cache_implementation=cache_implementation,
                  return_logps=True)
    torch.manual_seed(0)
    first = generate_completions(model, ids, mask, **kwargs)
    old_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    loss = -completion_logps(model, first.prompt_input_ids, first.prompt_attention_mask, first.completion_ids,
                             first.completion_mask).sum()
    loss.backward()
    optimizer.step()  # in place: the same tensors hold the new weights
    torch.manual_seed(1)
    second = generate_completions(model, ids, mask, **kwargs)
    args = (second.prompt_input_ids, second.prompt_attention_mask, second.completion_ids, second.completion_mask)
    with torch.no_grad():
        new = completion_per_token_logps(model, *args) * second.completion_mask
        old = completion_per_token_logps(old_model, *args) * second.completion_mask
    torch.testing.assert_close(second.sampling_per_token_logps, new, rtol=0, atol=1e-5)
    assert (second.sampling_per_token_logps - old).abs().max() > 0.1


def test_each_prompt_is_prefilled_once_for_its_samples(tiny_tokenizer):
    """With the dynamic cache, `generate` runs the tokens of each prompt but its last once (G rows), then the last
    prompt token of each of the G * k rows, then one token per row per decoding step; without `prefill_once` it
    runs every prompt token of all G * k rows. The samples stay exact draws (their sampler log-probs equal our
    forward's on the right prompts: a cache repeated in the wrong row order would pair rows with another
    prompt's keys and values)."""
    model = _model_with_distorting_defaults(tiny_tokenizer, "cpu")
    ids, mask = _prompts(tiny_tokenizer, "cpu")  # G = 2 prompts of P = 5 columns, one left-padded
    shapes = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    common = dict(num_generations=4, max_new_tokens=3, eos_token_id=stop_token_ids(model, tiny_tokenizer),
                  pad_token_id=tiny_tokenizer.pad_token_id, cache_implementation="dynamic", return_logps=True)
    try:
        torch.manual_seed(0)
        once = generate_completions(model, ids, mask, **common)
        prefills_once, shapes[:] = list(shapes), []
        torch.manual_seed(0)
        repeated = generate_completions(model, ids, mask, prefill_once=False, **common)
        prefills_repeated = list(shapes)
    finally:
        hook.remove()
    assert prefills_once[:3] == [(2, 4), (8, 1), (8, 1)]  # prompts without their last token, last token, decoding
    assert prefills_repeated[:2] == [(8, 5), (8, 1)]
    for out in (once, repeated):
        with torch.no_grad():
            forward = completion_per_token_logps(model, out.prompt_input_ids, out.prompt_attention_mask,
                                                 out.completion_ids, out.completion_mask) * out.completion_mask
        torch.testing.assert_close(out.sampling_per_token_logps, forward, rtol=0, atol=1e-5)
        assert torch.equal(out.prompt_input_ids, ids.repeat_interleave(4, dim=0))


def test_rows_of_a_sampling_call_look_drawn_alone():
    """Rows 2-3 of a call over prompts of width 4 and completions of width 5: their prompts have 2 and 1 pad
    tokens (1 column is padding in both), their completions 2 and 3 tokens (2 columns are padding in both)."""
    from hypo.sampling.generate import Completions

    pad = 0
    prompt_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [pad, pad, 9, 10], [pad, 11, 12, 13]])
    completion_ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [6, 7, pad, pad, pad], [8, 9, 10, pad, pad]])
    samples = Completions(prompt_input_ids=prompt_ids, prompt_attention_mask=(prompt_ids != pad).long(),
                          completion_ids=completion_ids, completion_mask=(completion_ids != pad).long(),
                          clipped=torch.tensor([True, True, False, False]),
                          sampling_per_token_logps=-torch.arange(20.0).reshape(4, 5))
    part = samples.rows(2, 4)
    assert torch.equal(part.prompt_input_ids, torch.tensor([[pad, 9, 10], [11, 12, 13]]))
    assert torch.equal(part.prompt_attention_mask, torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert torch.equal(part.completion_ids, torch.tensor([[6, 7, pad], [8, 9, 10]]))
    assert torch.equal(part.completion_mask, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert torch.equal(part.clipped, torch.tensor([False, False]))
    assert torch.equal(part.sampling_per_token_logps, -torch.tensor([[10.0, 11, 12], [15, 16, 17]]))
    assert torch.equal(samples.rows(0, 4).completion_ids, completion_ids)  # the whole call: nothing dropped
