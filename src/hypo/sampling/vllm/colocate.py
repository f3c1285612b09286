"""Colocate mode: a vLLM engine inside each training process, on its GPU."""

from __future__ import annotations

import os
import socket
import time

import torch

from hypo.sampling.generate import Completions
from hypo.sampling.vllm.protocol import completions_from_samples, neutral_sampling_params, prompt_token_lists
from hypo.sampling.vllm.weights import WeightPush, vllm_weights


class VLLMColocate:
    """A vLLM engine in this process (one per training process, on its GPU), as TRL's colocate mode: the
    engine keeps its own copy of the weights, loaded from the policy after each optimizer step.

    `distributed_executor_backend="external_launcher"` keeps the engine in this process (no engine
    subprocess), so weights are handed over as tensors and every training process runs its own engine on its
    own prompts.

    `enable_sleep_mode` (TRL's way): after each sampling the engine sleeps at level 2 (its weights and KV cache
    are freed: the backward passes get that memory back); a push wakes the weights and loads the policy's, a
    sampling wakes the KV cache. A sampling that finds the weights asleep (the next micro-step of the same
    optimizer step: no push came between) first loads the last pushed model's weights again.
    """

    pushes_from_main_process = False  # one engine per process: each loads its own copy

    def __init__(self, model_path: str, *, max_model_len: int, gpu_memory_utilization: float = 0.3,
                 seed: int = 0, dtype: str = "auto", enable_sleep_mode: bool = False, **engine_kwargs):
        from vllm import LLM

        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(name, value)  # set by accelerate under `accelerate launch`
        sleep = {"enable_sleep_mode": True} if enable_sleep_mode else {}
        self.llm = LLM(model=model_path, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       seed=seed + int(os.environ["RANK"]), dtype=dtype, generation_config="vllm",
                       logprobs_mode="processed_logprobs", distributed_executor_backend="external_launcher",
                       **sleep, **engine_kwargs)
        self.max_model_len = max_model_len
        self.enable_sleep_mode = enable_sleep_mode
        self.asleep: set[str] = set()  # the parts of the engine sleeping: "weights", "kv_cache"
        self._last_pushed = None  # what the weights were loaded from (re-loaded after a sleep without a push)

    def _wake(self, *tags: str) -> None:
        sleeping = [tag for tag in tags if tag in self.asleep]
        if sleeping:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand back the training's cached blocks first (TRL does the same)
            self.llm.wake_up(tags=sleeping)
            self.asleep.difference_update(sleeping)

    def sleep(self) -> None:
        """Free the engine's weights and KV cache until the next push or sampling (with `enable_sleep_mode`)."""
        if self.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = {"weights", "kv_cache"}

    @torch.no_grad()
    def generate(self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, *, num_generations: int,
                 max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int) -> Completions:
        """As `VLLMServerClient.generate`, with the in-process engine."""
        from vllm import SamplingParams

        if "weights" in self.asleep:  # asleep since the last sampling, no push since: the same weights again
            if self._last_pushed is None:
                raise RuntimeError("the vLLM engine's weights are asleep and nothing was pushed to it yet")
            self.push_weights(self._last_pushed)
        self._wake("kv_cache")
        prompts = prompt_token_lists(prompt_input_ids, prompt_attention_mask)
        stop_ids = torch.as_tensor(eos_token_id).reshape(-1).tolist()
        params = SamplingParams(**neutral_sampling_params(num_generations=num_generations, max_tokens=max_new_tokens,
                                                          stop_token_ids=stop_ids))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = []
        for output in outputs:  # one per prompt, in order
            for sample in sorted(output.outputs, key=lambda s: s.index):
                token_ids = list(sample.token_ids)
                logps = [entry[token].logprob for entry, token in zip(sample.logprobs, token_ids, strict=True)]
                samples.append((token_ids, logps))
        self.sleep()
        return completions_from_samples(prompt_input_ids, prompt_attention_mask, samples,
                                        num_generations=num_generations, max_new_tokens=max_new_tokens,
                                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def push_weights(self, model_or_state_dict) -> WeightPush:
        """Load the policy's weights into the engine's model, then clear the prefix cache.

        Through the worker's `reload_weights` (in this process: the tensors are passed, not copied to a file),
        which runs the model's `load_weights` (renaming and fusing q/k/v, gate/up) and then redoes each
        layer's post-load processing. TRL calls the driver worker's `model.load_weights` directly, which skips
        that processing: fine where kernels read the weights as loaded (unquantized on CUDA), stale where a
        backend keeps a processed copy (the CPU backend packs every linear layer).
        """
        start = time.perf_counter()
        self._wake("weights")
        counted = _Counted(vllm_weights(model_or_state_dict))  # one tensor at a time (LoRA: merged as it goes)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self._last_pushed = model_or_state_dict
        return WeightPush(counted.tensors, counted.bytes, 0.0, time.perf_counter() - start)

    def close(self) -> None:
        pass


class _Counted:
    """An iterator of (name, tensor) pairs that counts what went through it, holding none of it."""

    def __init__(self, items):
        self.items, self.tensors, self.bytes = iter(items), 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        name, tensor = next(self.items)
        self.tensors += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return name, tensor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


