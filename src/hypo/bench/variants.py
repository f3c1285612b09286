"""The variants of `hypo bench`, one per process: our DPO and HyPO, TRL's DPOTrainer and RLOOTrainer on the
same work, the machine probes, and sampling through vLLM.

TRL's RLOO does HyPO's online work when its reward is a constant and its KL penalty is on: sample k
completions per prompt, score them with the reference, and take a policy-gradient step.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypo.bench.probes import bench_device, measure_machine, sync, timed, weights_changed
from hypo.bench.settings import BenchSettings, median_after_warmup, peak_rss_gb


def run_ours(settings: BenchSettings, method: str, prompts_per_step: int) -> dict[str, Any]:
    """`hypo.training.trainer.train` for warm-up + measured steps; per-step medians from its metrics."""
    from hypo.evaluation.report import load_run
    from hypo.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        train(replace(settings.config, method=method, per_device_prompt_batch_size=prompts_per_step,
                      max_steps=settings.steps, eval_at_end=False, eval_steps=0, save_steps=0, output_dir=tmp))
        records = load_run(tmp).train_records
    result: dict[str, Any] = {"steps": len(records)}
    for key in ("time/step", "time/generation", "time/reference", "time/forward_backward", "time/optimizer"):
        result[key] = median_after_warmup([r[key] for r in records], settings.warmup_steps)
    tokens = [r["throughput/tokens_per_second"] * r["time/step"] for r in records]
    result["tokens_per_step"] = median_after_warmup(tokens, settings.warmup_steps)
    if method == "hypo":
        result["decode_steps"] = median_after_warmup([r["completions/max_length"] for r in records],
                                                      settings.warmup_steps)
    return result


def _step_timer():
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()  # the GPU's queued work belongs to the step before
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start)

    return StepTimes()


def _json_dataset(path: str | Path, rows: int):
    """The first `rows` rows of a local JSON-lines file as a `datasets.Dataset`."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train")
    return dataset.select(range(min(rows, len(dataset))))


def run_trl_dpo(settings: BenchSettings) -> dict[str, Any]:
    """TRL's DPOTrainer on the same pairs (reference log-probs computed each step, as ours on a first epoch)."""
    from trl import DPOConfig, DPOTrainer

    from hypo.models.loading import load_tokenizer, resolve_model_path
    from hypo.tasks import get_task
    from hypo.training.trl_args import trl_training_args

    config = settings.config
    path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=config.per_device_train_batch_size,
                         beta=config.beta, max_length=config.max_length, precompute_ref_log_probs=False,
                         **trl_training_args(config, max_steps=settings.steps))
        trainer = DPOTrainer(model=path, args=args, processing_class=load_tokenizer(path), callbacks=[timer],
                             train_dataset=_json_dataset(config.dataset or get_task(config.task).pairs,
                                                         settings.steps * config.per_device_train_batch_size))
        trainer.train()
    return {"steps": len(timer.times), "time/step": median_after_warmup(timer.times, settings.warmup_steps)}


def constant_reward(completions, **kwargs) -> list[float]:
    """A reward of 0 for every completion: RLOO's update is then driven by its KL penalty alone."""
    return [0.0] * len(completions)


def run_trl_rloo(settings: BenchSettings) -> dict[str, Any]:
    """TRL's RLOOTrainer on the same prompts, k, completion length and KL coefficient, constant reward."""
    from trl import RLOOConfig, RLOOTrainer

    from hypo.models.loading import load_tokenizer, resolve_model_path
    from hypo.tasks import get_task
    from hypo.training.trl_args import trl_rloo_args

    config = settings.config
    path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = RLOOConfig(output_dir=tmp, **trl_rloo_args(config, max_steps=settings.steps))
        trainer = RLOOTrainer(model=path, reward_funcs=constant_reward, args=args, callbacks=[timer],
                              processing_class=load_tokenizer(path),
                              train_dataset=_json_dataset(config.prompts or get_task(config.task).prompts,
                                                          settings.steps * config.per_device_prompt_batch_size))
        trainer.train()
    return {"steps": len(timer.times), "time/step": median_after_warmup(timer.times, settings.warmup_steps)}


def run_vllm_sampling(settings: BenchSettings) -> dict[str, Any]:
    """The online sampling of a HyPO step through a vLLM server (`--vllm_server_base_url`, else one started
    here from .venv-vllm), next to transformers' generate on the same prompts in this process: per step, a
    push of the policy's full weights (counted in the step, as the loop pays it after each optimizer step),
    then k samples per prompt. Also the per-token gap between vLLM's log-probs and our forward's.

    The training loop is not involved: the policy does not change between steps (a push costs the same)."""
    import contextlib

    import torch

    from hypo.data.batches import PromptCollator
    from hypo.data.encoding import load_prompt_data
    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.models.tokens import stop_token_ids
    from hypo.sampling.generate import generate_completions
    from hypo.sampling.vllm.process import start_vllm_server
    from hypo.sampling.vllm.protocol import per_token_logp_gap
    from hypo.sampling.vllm.server import VLLMServerClient
    from hypo.tasks import get_task

    config, device = settings.config, bench_device()
    if config.num_threads:  # both sides get as many cores: this process's torch, the CPU server's OpenMP
        torch.set_num_threads(config.num_threads)
    path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    tokenizer, policy = load_tokenizer(path), load_causal_lm(path, config.dtype).to(device).eval()
    stops = stop_token_ids(policy, tokenizer)
    items, _ = load_prompt_data(config.prompts or str(get_task(config.task).prompts), tokenizer,
                                max_prompt_length=config.max_prompt_length)
    size = config.per_device_prompt_batch_size
    batches = [PromptCollator(tokenizer.pad_token_id)(items[(i * size) % len(items):][:size])
               for i in range(settings.steps)]
    with contextlib.ExitStack() as stack:
        url, started = config.vllm_server_base_url, None
        if url is None:
            started = stack.enter_context(start_vllm_server(
                path, dtype="float32" if device.type == "cpu" else "auto",
                max_model_len=config.max_prompt_length + config.max_completion_length, threads=config.num_threads))
            url = started.url
        client = VLLMServerClient(url, timeout=config.vllm_server_timeout,
                                  weights_dir=config.vllm_server_weights_dir).wait_until_ready()
        stack.callback(client.close)
        records = []
        for batch in batches:
            ids, mask = batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)
            args = dict(num_generations=config.num_generations, max_new_tokens=config.max_completion_length,
                        eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            push = client.push_weights(policy)
            start = time.perf_counter()
            samples = client.generate(ids, mask, **args)
            vllm_seconds = time.perf_counter() - start
            transformers_seconds = timed(lambda: generate_completions(  # noqa: B023
                policy, ids, mask, cache_implementation=config.cache_implementation, **args))  # noqa: B023
            gap_max, _ = per_token_logp_gap(policy, samples)
            records.append({"push": push.seconds, "push_write": push.write_seconds, "push_reload": push.load_seconds,
                            "generation": vllm_seconds, "transformers": transformers_seconds,
                            "gap_max": gap_max, "decode_steps": samples.completion_ids.shape[1]})
    median = lambda key: median_after_warmup([r[key] for r in records], settings.warmup_steps)  # noqa: E731
    return {
        "server": "started here" if started else url, "steps": len(records), "weight_bytes": push.bytes,
        "time/step": median("push") + median("generation"), "time/generation": median("generation"),
        "time/weight_push": median("push"), "time/weight_push_write": median("push_write"),
        "time/weight_push_reload": median("push_reload"), "time/generation_transformers": median("transformers"),
        "decode_steps": median("decode_steps"), "logprob_gap_max": max(r["gap_max"] for r in records),
        "torch_threads": torch.get_num_threads(),
    }


def variants(settings: BenchSettings) -> list[str]:
    names = ["machine", "dpo", "hypo"] + [f"hypo-prompts{n}" for n in settings.fewer_prompts]
    return names + (["trl-dpo", "trl-rloo"] if settings.trl else []) + \
        (["weights-changed"] if settings.weights_changed else []) + (["vllm-sampling"] if settings.vllm else [])


def run_variant(name: str, settings: BenchSettings) -> dict[str, Any]:
    if name == "machine":
        result = measure_machine(settings)
    elif name == "dpo":
        result = run_ours(settings, "dpo", settings.config.per_device_prompt_batch_size)
    elif name == "hypo":
        result = run_ours(settings, "hypo", settings.config.per_device_prompt_batch_size)
    elif name.startswith("hypo-prompts"):
        result = run_ours(settings, "hypo", int(name.removeprefix("hypo-prompts")))
    elif name == "trl-dpo":
        result = run_trl_dpo(settings)
    elif name == "trl-rloo":
        result = run_trl_rloo(settings)
    elif name == "weights-changed":
        result = weights_changed(settings)
    elif name == "vllm-sampling":
        result = run_vllm_sampling(settings)
    else:
        raise ValueError(f"unknown bench variant {name!r}")
    result["peak_rss_gb"] = peak_rss_gb()
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return result


