"""HyPO's online samples from vLLM: a `vllm serve` process (`server`) or an engine in each training process
(`colocate`); `protocol` (requests and answers, no vLLM needed), `weights` (what the engine loads, and the push
after every optimizer step). See docs/vllm.md.
"""

from __future__ import annotations


def make_vllm_sampler(config, model_path: str, *, seed: int | None = None):
    """The vLLM sampler a `HyPOConfig` asks for: a `VLLMServerClient` (checked to be up) or a `VLLMColocate`
    engine on `model_path` (the policy's initial weights; push the current ones before sampling)."""
    from hypo.sampling.vllm.colocate import VLLMColocate
    from hypo.sampling.vllm.server import VLLMServerClient

    if config.vllm_mode == "server":
        client = VLLMServerClient(config.vllm_server_base_url or "http://127.0.0.1:8000",
                                  timeout=config.vllm_server_timeout, weights_dir=config.vllm_server_weights_dir)
        return client.wait_until_ready()
    return VLLMColocate(model_path, max_model_len=config.max_prompt_length + config.max_completion_length,
                        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                        seed=config.seed if seed is None else seed,
                        enable_sleep_mode=config.vllm_enable_sleep_mode)
