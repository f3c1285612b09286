"""The colocate test's process (run by tests/test_vllm_colocate.py with the Python of .venv-vllm, which has
vLLM's CPU build and its own transformers): a vLLM engine in this process on MODEL, samples, our log-probs
of them, an optimizer step, a weight push, samples again. Prints one JSON line.

    .venv-vllm/bin/python tests/vllm_colocate_worker.py MODEL
"""

from __future__ import annotations

import copy
import json
import sys

import torch

QUESTIONS = ["Write a short review of a small cafe by the river.", "Describe a rainy afternoon in two sentences.",
             "Give one tip for a new runner.", "What makes a board game fun?"]


def main(path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hypo.models.tokens import stop_token_ids
    from hypo.objective.logprobs import completion_per_token_logps, sequence_logps
    from hypo.sampling.vllm.colocate import VLLMColocate
    from hypo.sampling.vllm.protocol import per_token_logp_gap

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stops = stop_token_ids(policy, tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    engine = VLLMColocate(path, max_model_len=512, dtype="float32", seed=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    result = {"push_seconds": [], "max_gap": [], "mean_gap": [], "mean_gap_to_previous_weights": []}
    before = None
    for _ in range(2):
        push = engine.push_weights(policy)
        result["push_seconds"].append(push.seconds)
        samples = engine.generate(batch["input_ids"], batch["attention_mask"], num_generations=2, max_new_tokens=24,
                                  eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        largest, mean = per_token_logp_gap(policy, samples)
        result["max_gap"].append(largest)
        result["mean_gap"].append(mean)
        if before is not None:
            result["mean_gap_to_previous_weights"].append(per_token_logp_gap(before, samples)[1])
        before = copy.deepcopy(policy)
        logps = sequence_logps(completion_per_token_logps(policy, samples.prompt_input_ids,
                                                          samples.prompt_attention_mask, samples.completion_ids,
                                                          samples.completion_mask), samples.completion_mask)
        (-logps.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        result["rows"] = samples.completion_ids.shape[0]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
