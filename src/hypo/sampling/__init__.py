"""Samples of the current policy: `num_generations` completions per prompt with transformers' generate
(`generate`), or with vLLM (`vllm`), as exact draws for the online KL term."""
