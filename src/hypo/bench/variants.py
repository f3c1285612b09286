"""The variants of `hypo bench`, one per process: our DPO and HyPO (with one sampling call per optimizer step,
and per micro-step), TRL's DPOTrainer and RLOOTrainer on the same work, the machine probes, the sampler's cost
by batch, and sampling through vLLM (alone, and in our loop with and without overlap).

TRL's RLOO does HyPO's online work when its reward is a constant and its KL penalty is on: sample k
completions per prompt, score them with the reference, and take a policy-gradient step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypo.bench.probes import bench_device, measure_machine, sync, timed, weights_changed
from hypo.bench.settings import BenchSettings, median_after_warmup, peak_rss_gb


def run_ours(settings: BenchSettings, method: str, prompts_per_step: int, **overrides) -> dict[str, Any]:
    """`hypo.training.trainer.train` for warm-up + measured steps; per-step medians from its metrics.
    `overrides`: workload options of this variant (e.g. steps_per_generation)."""
    from hypo.evaluation.report import load_run
    from hypo.training.trainer import train

    config = replace(settings.config, method=method, per_device_prompt_batch_size=prompts_per_step,
                     max_steps=settings.steps, eval_at_end=False, eval_steps=0, save_steps=0, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        train(replace(config, output_dir=tmp))
        records = load_run(tmp).train_records
    result: dict[str, Any] = {"steps": len(records)}
    for key in ("time/step", "time/generation", "time/reference", "time/forward_backward", "time/optimizer"):
        result[key] = median_after_warmup([r[key] for r in records], settings.warmup_steps)
    tokens = [r["throughput/tokens_per_second"] * r["time/step"] for r in records]
    result["tokens_per_step"] = median_after_warmup(tokens, settings.warmup_steps)
    if method == "hypo":  # decoding steps per optimizer step: of each sampling call, times the calls
        calls = config.gradient_accumulation_steps // (config.steps_per_generation or config.gradient_accumulation_steps)
        result["sampling_calls"] = calls
        result["samples_per_call"] = prompts_per_step * config.num_generations * (
            config.gradient_accumulation_steps // calls)
        result["decode_steps"] = calls * median_after_warmup([r["completions/max_length"] for r in records],
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
                                                         settings.steps * config.per_device_train_batch_size
                                                         * config.gradient_accumulation_steps))
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
                                                          settings.steps * config.per_device_prompt_batch_size
                                                          * config.gradient_accumulation_steps))
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


SAMPLING_BATCHES = (8, 16, 32, 64)
"""Samples per call in the `sampling-by-batch` variant (k = num_generations samples per prompt)."""


def sampling_by_batch(settings: BenchSettings, repeats: int = 2) -> dict[str, Any]:
    """The online sampler (`generate_completions`, as the loop calls it) on calls of 8 to 64 samples from the
    task's prompts: seconds per call, per sample and per decoding step (median of `repeats` after a warm-up),
    and at the smallest and a larger batch the same calls with every prompt prefilled k times (the lever
    `prefill_once` removes). Real draws: a call runs until its longest sample stops."""
    import torch

    from hypo.data.batches import PromptCollator
    from hypo.data.encoding import load_prompt_data
    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.models.tokens import stop_token_ids
    from hypo.sampling.generate import generate_completions
    from hypo.tasks import get_task

    config, device = settings.config, bench_device()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    tokenizer, model = load_tokenizer(path), load_causal_lm(path, config.dtype).to(device).eval()
    stops, k = stop_token_ids(model, tokenizer), config.num_generations
    items, _ = load_prompt_data(config.prompts or str(get_task(config.task).prompts), tokenizer,
                                max_prompt_length=config.max_prompt_length)

    def call(samples: int, prefill_once: bool = True) -> dict[str, float]:
        prompts = max(1, samples // k)
        batch = {key: value.to(device) for key, value in
                 PromptCollator(tokenizer.pad_token_id)([items[i % len(items)] for i in range(prompts)]).items()}
        times, steps = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            out = generate_completions(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                       num_generations=k, max_new_tokens=config.max_completion_length,
                                       eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                       cache_implementation=config.cache_implementation, prefill_once=prefill_once)
            sync()
            times.append(time.perf_counter() - start)
            steps.append(out.completion_ids.shape[1])
        seconds, decode_steps = statistics.median(times), statistics.median(steps)
        return {"samples": prompts * k, "seconds": seconds, "seconds_per_sample": seconds / (prompts * k),
                "decode_steps": decode_steps, "seconds_per_decode_step": seconds / decode_steps}

    call(SAMPLING_BATCHES[0])  # warm-up
    result: dict[str, Any] = {"by_batch": [call(n) for n in SAMPLING_BATCHES]}
    result["prompt_prefilled_k_times"] = [call(n, prefill_once=False) for n in (SAMPLING_BATCHES[0], SAMPLING_BATCHES[2])]
    return result


def run_vllm_training(settings: BenchSettings, overlap: bool) -> dict[str, Any]:
    """Our HyPO loop sampling through a vLLM server started here from .venv-vllm (or the one at
    --vllm_server_base_url), with and without `vllm_server_overlap`. On a CPU the server and the trainer
    are given one core each (the server's OpenMP threads bound to the first core this process may use, the
    trainer's one torch thread pinned to the second), so that overlapping them can show: without it one waits
    while the other works. It cannot show a GPU's proportions (a server GPU beside training GPUs)."""
    import contextlib
    import os

    from hypo.models.loading import resolve_model_path
    from hypo.sampling.vllm.process import start_vllm_server

    config, device = settings.config, bench_device()
    cores = sorted(os.sched_getaffinity(0))
    split = device.type == "cpu" and len(cores) >= 2 and config.vllm_server_base_url is None
    with contextlib.ExitStack() as stack:
        url = config.vllm_server_base_url
        if url is None:
            path = resolve_model_path(config.model_name_or_path, config.gguf_file)
            url = stack.enter_context(start_vllm_server(
                path, dtype="float32" if device.type == "cpu" else "auto", threads=1 if split else config.num_threads,
                max_model_len=config.max_prompt_length + config.max_completion_length)).url
        overrides = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": url,
                     "vllm_server_overlap": overlap}
        if split:
            os.sched_setaffinity(0, {cores[1]})
            overrides["num_threads"] = 1
        result = run_ours(settings, "hypo", config.per_device_prompt_batch_size, **overrides)
    result["cores"] = "server 1 + trainer 1" if split else "shared"
    return result


def variants(settings: BenchSettings) -> list[str]:
    names = ["machine", "sampling-by-batch", "dpo", "hypo"]
    if settings.config.gradient_accumulation_steps > 1 and settings.config.steps_per_generation != 1:
        names.append("hypo-sample-per-micro-step")  # the loop before one call per optimizer step
    names += [f"hypo-prompts{n}" for n in settings.fewer_prompts]
    return names + (["trl-dpo", "trl-rloo"] if settings.trl else []) + \
        (["weights-changed"] if settings.weights_changed else []) + \
        (["vllm-sampling", "hypo-vllm-server", "hypo-vllm-server-no-overlap"] if settings.vllm else [])


def run_variant(name: str, settings: BenchSettings) -> dict[str, Any]:
    if name == "machine":
        result = measure_machine(settings)
    elif name == "dpo":
        result = run_ours(settings, "dpo", settings.config.per_device_prompt_batch_size)
    elif name == "hypo":
        result = run_ours(settings, "hypo", settings.config.per_device_prompt_batch_size)
    elif name == "hypo-sample-per-micro-step":
        result = run_ours(settings, "hypo", settings.config.per_device_prompt_batch_size, steps_per_generation=1)
    elif name == "sampling-by-batch":
        result = sampling_by_batch(settings)
    elif name in ("hypo-vllm-server", "hypo-vllm-server-no-overlap"):
        result = run_vllm_training(settings, overlap=name == "hypo-vllm-server")
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


