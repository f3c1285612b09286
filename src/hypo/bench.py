"""`hypo bench`: our DPO and HyPO next to TRL's DPOTrainer and RLOOTrainer, in one run.

Every variant trains the same model on the same pairs and prompts with the same batch shape, lengths,
learning rate and seed, in its own process (so each has its own peak memory, and none slows another),
one after the other. Each reports the median seconds per optimizer step after warm-up steps and its
peak resident memory. A first process measures the machine: fp32 matmul FLOP/s, copy bandwidth, one
decoding step of sampled generation at the online batch size, and a plain forward+backward of the model.

The floor of a step (what the hardware cannot beat): training work 6 x params x tokens and reference work
2 x params x tokens at the measured matmul rate, plus one read of the weights per decoding step at the
measured bandwidth. Ratios printed: our DPO / TRL DPO, our HyPO / (TRL DPO + TRL RLOO), HyPO / its floor,
a decoding step / its weight-read floor, forward+backward FLOP/s / matmul FLOP/s, HyPO / DPO peak memory,
and HyPO / DPO step time with fewer online prompts per step.

TRL's RLOO does HyPO's online work when its reward is a constant and its KL penalty is on: sample k
completions per prompt, score them with the reference, and take a policy-gradient step.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hypo.config import HyPOConfig

RESULT_PREFIX = "BENCH_RESULT "
TARGETS = {
    "cpu": {
        "dpo_vs_trl_dpo": ("<=", 0.8),
        "hypo_vs_trl_dpo_plus_rloo": ("<=", 0.6),
        "hypo_vs_floor": ("<=", 1.5),
        "decode_step_vs_floor": ("<=", 2.0),
        "forward_backward_vs_matmul": (">=", 0.7),
        "hypo_vs_dpo_peak_memory": ("<=", 1.2),
    },
    "cuda": {
        "dpo_vs_trl_dpo": ("<=", 0.7),
        "hypo_vs_trl_dpo_plus_rloo": ("<=", 0.3),
        "hypo_vs_dpo_step": ("<=", 4.0),
        "decode_step_vs_floor": ("<=", 3.0),
        "hypo_vs_dpo_peak_memory": ("<=", 1.2),
    },
}
"""Targets of the ratios by device: the same command compares against TRL on a CPU or a GPU."""


def _workload() -> HyPOConfig:
    return HyPOConfig(eval_at_end=False)


@dataclass
class BenchSettings:
    """The benchmark's own options. The workload is a `HyPOConfig` (default: the default training run's
    shape, 4 pairs + 4 prompts x 2 samples of up to 64 tokens per step, on the embedded SmolLM2-135M-Instruct
    and the bundled task); every variant, ours and TRL's, trains under it."""

    config: HyPOConfig = field(default_factory=_workload)
    warmup_steps: int = 2
    measured_steps: int = 5
    fewer_prompts: tuple[int, ...] = (2, 1)
    trl: bool = True
    weights_changed: bool = False
    vllm: bool = False

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.measured_steps

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchSettings:
        raw = json.loads(text)
        return cls(config=HyPOConfig(**raw.pop("config")), fewer_prompts=tuple(raw.pop("fewer_prompts")), **raw)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _median_after_warmup(values: list[float], warmup: int) -> float:
    kept = values[warmup:] or values
    return statistics.median(kept)


# --- the machine -------------------------------------------------------------------------------------------


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def measure_matmul(n: int = 2048, repeats: int = 10, dtype=None) -> float:
    """Matmul FLOP/s on the bench device (median of `repeats`): fp32 on a CPU, `dtype` (the training
    compute precision) on a GPU."""
    import torch

    a = torch.randn(n, n, device=_device(), dtype=dtype)
    b = torch.randn(n, n, device=_device(), dtype=dtype)
    a @ b
    return 2 * n**3 / statistics.median(_timed(lambda: a @ b) for _ in range(repeats))


def measure_copy_bandwidth(megabytes: int = 512, repeats: int = 8) -> float:
    """Bytes read + written per second by a large tensor copy (median of `repeats`)."""
    import torch

    source = torch.randn(megabytes * 2**20 // 4, device=_device())
    target = torch.empty_like(source)
    target.copy_(source)
    return 2 * source.numel() * 4 / statistics.median(_timed(lambda: target.copy_(source)) for _ in range(repeats))


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 8) -> float:
    """Bytes read per second by a sum over a large tensor (median of `repeats`): a check on the copy figure."""
    import torch

    source = torch.randn(megabytes * 2**20 // 4, device=_device())
    source.sum()
    return source.numel() * 4 / statistics.median(_timed(lambda: source.sum()) for _ in range(repeats))


def measure_machine(settings: BenchSettings) -> dict[str, float]:
    """Matmul rate, copy bandwidth, a decoding step at the online batch size and a plain forward+backward,
    on the bench device, at the training compute precision (bf16 autocast on GPUs by default)."""
    import torch

    from hypo.data import PromptCollator, load_prompt_data
    from hypo.models import load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.sampling import resolve_cache_implementation, sampling_kwargs
    from hypo.tasks import get_task
    from hypo.trainer import resolve_mixed_precision

    config, device = settings.config, _device()
    precision = resolve_mixed_precision(config.mixed_precision)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(config.seed)
    result = {"device": device.type, "mixed_precision": precision,
              "matmul_flops": measure_matmul(dtype=compute_dtype if device.type == "cuda" else None),
              "copy_bytes_per_second": measure_copy_bandwidth(), "read_bytes_per_second": measure_read_bandwidth()}
    path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    tokenizer, model = load_tokenizer(path), load_causal_lm(path, config.dtype).to(device)
    params = sum(p.numel() for p in model.parameters())
    result["params"] = params
    result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    items, _ = load_prompt_data(config.prompts or str(get_task(config.task).prompts), tokenizer,
                                max_prompt_length=config.max_prompt_length)
    batch = {k: v.to(device) for k, v in
             PromptCollator(tokenizer.pad_token_id)(items[: config.per_device_prompt_batch_size]).items()}
    rows = config.per_device_prompt_batch_size * config.num_generations
    autocast = lambda: torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None)  # noqa: E731

    cache = resolve_cache_implementation(config.cache_implementation, device)

    def generate(new_tokens: int) -> float:
        kwargs = sampling_kwargs(max_new_tokens=new_tokens, num_return_sequences=config.num_generations,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 cache_implementation=cache)
        kwargs["min_new_tokens"] = new_tokens  # a fixed number of decoding steps
        with torch.no_grad(), autocast():
            return _timed(lambda: model.generate(input_ids=batch["prompt_input_ids"],
                                                 attention_mask=batch["prompt_attention_mask"], **kwargs))

    generate(4)
    prefill = statistics.median(generate(1) for _ in range(3))
    full = statistics.median(generate(config.max_completion_length) for _ in range(2))
    result["decode_step_seconds"] = (full - prefill) / (config.max_completion_length - 1)
    result["decode_batch"] = rows
    result["decode_cache"] = cache
    result["decode_step_floor_seconds"] = result["param_bytes"] / result["copy_bytes_per_second"]

    model.train()
    ids = torch.randint(0, model.config.vocab_size, (rows, 128), device=device)

    def forward_backward() -> None:
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd = _median_after_warmup([_timed(forward_backward) for _ in range(4)], 1)
    result["forward_backward_seconds"] = fwd_bwd
    result["forward_backward_tokens"] = ids.numel()
    result["forward_backward_flops"] = 6 * params * ids.numel() / fwd_bwd
    return result


def weights_changed(settings: BenchSettings, steps: int = 12) -> dict[str, float]:
    """Fraction of weight elements that differ from the initial ones after `steps` DPO steps at the
    workload's learning rate: with float32 weights under the default mixed precision, and with bfloat16
    weights (what bf16 training without master weights keeps)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from hypo.models import resolve_model_path
    from hypo.trainer import train

    config = settings.config
    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model_name_or_path, config.gguf_file),
                                                   dtype=torch.float32).state_dict()
    out = {}
    for name, dtype in (("float32_weights", "float32"), ("bfloat16_weights", "bfloat16")):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = replace(config, method="dpo", dtype=dtype, max_steps=steps, eval_at_end=False, eval_steps=0,
                          save_steps=0, output_dir=tmp)
            model_dir = train(run).model_dir
            after = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        changed = sum((after[k] != initial[k].to(getattr(torch, dtype)).float()).sum().item() for k in after)
        out[f"changed_fraction_{name}"] = changed / sum(v.numel() for v in after.values())
    return out


# --- our trainer ----------------------------------------------------------------------------------------


def run_ours(settings: BenchSettings, method: str, prompts_per_step: int) -> dict[str, Any]:
    """`hypo.trainer.train` for warm-up + measured steps; per-step medians from its metrics."""
    from hypo.report import load_run
    from hypo.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        train(replace(settings.config, method=method, per_device_prompt_batch_size=prompts_per_step,
                      max_steps=settings.steps, eval_at_end=False, eval_steps=0, save_steps=0, output_dir=tmp))
        records = load_run(tmp).train_records
    result: dict[str, Any] = {"steps": len(records)}
    for key in ("time/step", "time/generation", "time/reference", "time/forward_backward", "time/optimizer"):
        result[key] = _median_after_warmup([r[key] for r in records], settings.warmup_steps)
    tokens = [r["throughput/tokens_per_second"] * r["time/step"] for r in records]
    result["tokens_per_step"] = _median_after_warmup(tokens, settings.warmup_steps)
    if method == "hypo":
        result["decode_steps"] = _median_after_warmup([r["completions/max_length"] for r in records],
                                                      settings.warmup_steps)
    return result


# --- TRL -----------------------------------------------------------------------------------------------


def _step_timer():
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
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

    from hypo.models import load_tokenizer, resolve_model_path
    from hypo.tasks import get_task
    from hypo.trl_args import trl_training_args

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
    return {"steps": len(timer.times), "time/step": _median_after_warmup(timer.times, settings.warmup_steps)}


def constant_reward(completions, **kwargs) -> list[float]:
    """A reward of 0 for every completion: RLOO's update is then driven by its KL penalty alone."""
    return [0.0] * len(completions)


def run_trl_rloo(settings: BenchSettings) -> dict[str, Any]:
    """TRL's RLOOTrainer on the same prompts, k, completion length and KL coefficient, constant reward."""
    from trl import RLOOConfig, RLOOTrainer

    from hypo.models import load_tokenizer, resolve_model_path
    from hypo.tasks import get_task
    from hypo.trl_args import trl_rloo_args

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
    return {"steps": len(timer.times), "time/step": _median_after_warmup(timer.times, settings.warmup_steps)}


# --- vLLM sampling ------------------------------------------------------------------------------------------


def run_vllm_sampling(settings: BenchSettings) -> dict[str, Any]:
    """The online sampling of a HyPO step through a vLLM server (`--vllm_server_base_url`, else one started
    here from .venv-vllm), next to transformers' generate on the same prompts in this process: per step, a
    push of the policy's full weights (counted in the step, as the loop pays it after each optimizer step),
    then k samples per prompt. Also the per-token gap between vLLM's log-probs and our forward's.

    The training loop is not involved: the policy does not change between steps (a push costs the same)."""
    import contextlib

    import torch

    from hypo.data import PromptCollator, load_prompt_data
    from hypo.models import load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.sampling import generate_completions, stop_token_ids
    from hypo.tasks import get_task
    from hypo.vllm_sampling import VLLMServerClient, per_token_logp_gap
    from hypo.vllm_server import start_vllm_server

    config, device = settings.config, _device()
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
            transformers_seconds = _timed(lambda: generate_completions(  # noqa: B023
                policy, ids, mask, cache_implementation=config.cache_implementation, **args))  # noqa: B023
            gap_max, _ = per_token_logp_gap(policy, samples)
            records.append({"push": push.seconds, "push_write": push.write_seconds, "push_reload": push.load_seconds,
                            "generation": vllm_seconds, "transformers": transformers_seconds,
                            "gap_max": gap_max, "decode_steps": samples.completion_ids.shape[1]})
    median = lambda key: _median_after_warmup([r[key] for r in records], settings.warmup_steps)  # noqa: E731
    return {
        "server": "started here" if started else url, "steps": len(records), "weight_bytes": push.bytes,
        "time/step": median("push") + median("generation"), "time/generation": median("generation"),
        "time/weight_push": median("push"), "time/weight_push_write": median("push_write"),
        "time/weight_push_reload": median("push_reload"), "time/generation_transformers": median("transformers"),
        "decode_steps": median("decode_steps"), "logprob_gap_max": max(r["gap_max"] for r in records),
        "torch_threads": torch.get_num_threads(),
    }


# --- one variant per process -------------------------------------------------------------------------------


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
    result["peak_rss_gb"] = _peak_rss_gb()
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return result


def _spawn(name: str, settings: BenchSettings) -> dict[str, Any]:
    command = [sys.executable, "-m", "hypo.bench", name, settings.to_json()]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"bench variant {name} failed (exit {done.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_seconds"] = time.perf_counter() - start
    return result


# --- ratios ---------------------------------------------------------------------------------------------


def hypo_floor_seconds(hypo: dict[str, Any], machine: dict[str, float]) -> float:
    """Training (6N) and reference (2N) FLOPs of the step's distinct tokens (each prompt once) at the
    matmul rate, plus one read of the weights per decoding step at the copy bandwidth (bytes read and
    written per second by a large copy)."""
    compute = 8 * machine["params"] * hypo["tokens_per_step"] / machine["matmul_flops"]
    return compute + hypo["decode_steps"] * machine["decode_step_floor_seconds"]


def _memory_key(result: dict[str, Any]) -> str:
    """GPU memory where the run used a GPU, resident memory otherwise."""
    return "peak_gpu_gb" if "peak_gpu_gb" in result else "peak_rss_gb"


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    machine, dpo, hypo = results["machine"], results["dpo"], results["hypo"]
    out = {
        "hypo_vs_floor": hypo["time/step"] / hypo_floor_seconds(hypo, machine),
        "decode_step_vs_floor": machine["decode_step_seconds"] / machine["decode_step_floor_seconds"],
        "forward_backward_vs_matmul": machine["forward_backward_flops"] / machine["matmul_flops"],
        "hypo_vs_dpo_peak_memory": hypo[_memory_key(hypo)] / dpo[_memory_key(dpo)],
        "hypo_vs_dpo_step": hypo["time/step"] / dpo["time/step"],
    }
    for name, result in results.items():
        if name.startswith("hypo-prompts"):
            out[f"{name}_vs_dpo_step"] = result["time/step"] / dpo["time/step"]
    if "trl-dpo" in results:
        out["dpo_vs_trl_dpo"] = dpo["time/step"] / results["trl-dpo"]["time/step"]
    if "vllm-sampling" in results:  # a sampling step with vLLM (weight push + generation) / transformers' generate
        vllm = results["vllm-sampling"]
        out["vllm_vs_transformers_sampling"] = vllm["time/step"] / vllm["time/generation_transformers"]
    if "trl-dpo" in results and "trl-rloo" in results:
        out["hypo_vs_trl_dpo_plus_rloo"] = hypo["time/step"] / (
            results["trl-dpo"]["time/step"] + results["trl-rloo"]["time/step"])
    return out


def _meets(name: str, value: float, device: str = "cpu") -> str:
    if name not in TARGETS[device]:
        return ""
    op, target = TARGETS[device][name]
    ok = value <= target if op == "<=" else value >= target
    return f"{op} {target:g}: {'met' if ok else 'NOT met'}"


def markdown(results: dict[str, dict[str, Any]], computed: dict[str, float], settings: BenchSettings) -> str:
    machine, config = results["machine"], settings.config
    lines = [
        f"Workload: {config.per_device_train_batch_size} pairs + {config.per_device_prompt_batch_size} prompts x "
        f"{config.num_generations} samples of up to {config.max_completion_length} tokens per step; "
        f"median of {settings.measured_steps} steps after {settings.warmup_steps} warm-up steps; model "
        f"{config.model_name_or_path} ({machine['params'] / 1e6:.1f}M params, {config.dtype} weights); device "
        f"{machine.get('device', 'cpu')}, mixed precision {machine.get('mixed_precision', 'no')}.",
        "",
        f"Machine: matmul {machine['matmul_flops'] / 1e9:.0f} GFLOP/s, copy {machine['copy_bytes_per_second'] / 1e9:.1f}"
        f" GB/s (read+write traffic), sum-read {machine.get('read_bytes_per_second', float('nan')) / 1e9:.1f} GB/s;"
        f" decoding step at batch {machine['decode_batch']}: {machine['decode_step_seconds'] * 1e3:.0f} ms "
        f"(weight-read floor {machine['decode_step_floor_seconds'] * 1e3:.0f} ms); forward+backward "
        f"{machine['forward_backward_tokens']} tokens: {machine['forward_backward_seconds']:.2f} s = "
        f"{machine['forward_backward_flops'] / 1e9:.0f} GFLOP/s.",
        "",
        "| variant | s/step | generation | reference | forward+backward | optimizer | peak RSS GB | peak GPU GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name in ("machine", "weights-changed", "vllm-sampling"):
            continue
        parts = [f"{r[k]:.3f}" if k in r else "" for k in
                 ("time/step", "time/generation", "time/reference", "time/forward_backward", "time/optimizer",
                  "peak_rss_gb", "peak_gpu_gb")]
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {_meets(name, value, machine.get('device', 'cpu'))} |"
              for name, value in computed.items()]
    if "vllm-sampling" in results:
        v = results["vllm-sampling"]
        lines += ["", f"Sampling with vLLM (server {v['server']}): weight push {v['time/weight_push']:.2f} s "
                  f"({v['weight_bytes'] / 1e6:.0f} MB: write {v['time/weight_push_write']:.2f} s, reload "
                  f"{v['time/weight_push_reload']:.2f} s) + generation {v['time/generation']:.2f} s = "
                  f"{v['time/step']:.2f} s per step, against transformers' generate "
                  f"{v['time/generation_transformers']:.2f} s on the same prompts; largest per-token gap between "
                  f"vLLM's log-probs and ours {v['logprob_gap_max']:.1e}."]
    if "weights-changed" in results:
        changed = results["weights-changed"]
        lines += ["", f"Weight elements changed after 12 DPO steps at lr {config.learning_rate:g}: float32 weights "
                  f"under {machine.get('mixed_precision', 'no')} autocast {changed['changed_fraction_float32_weights']:.3f}, "
                  f"bfloat16 weights {changed['changed_fraction_bfloat16_weights']:.3f}."]
    return "\n".join(lines) + "\n"


def bench(settings: BenchSettings, output: Path) -> dict[str, Any]:
    results = {}
    for name in variants(settings):
        print(f"bench: {name} ...", flush=True)
        results[name] = _spawn(name, settings)
        print(f"  {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()})}",
              flush=True)
    computed = ratios(results)
    report = {"settings": asdict(settings), "results": results, "ratios": computed,
              "environment": {"torch_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                              "malloc_tuned": "MALLOC_MMAP_THRESHOLD_" in os.environ}}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(markdown(results, computed, settings))
    return report


RANDOM_SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3},
}
"""Llama shapes for speed measurements without downloading a model (TinyLlama-1.1B, SmolLM2-135M)."""


def make_random_llama(shape: str) -> Path:
    """A randomly initialized Llama of a named shape with the embedded model's tokenizer, saved to the hypo
    cache (once per shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hypo.models import cache_dir, load_tokenizer, resolve_model_path

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"random_model must be one of {', '.join(RANDOM_SHAPES)}, got {shape!r}")
    out = cache_dir() / "models" / f"random-llama-{shape}"
    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer(resolve_model_path(None))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         **RANDOM_SHAPES[shape]))
    partial = out.with_name(out.name + f".partial{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out


@dataclass
class BenchOptions:
    """`hypo bench`'s own options (the workload takes every `hypo train` option)."""

    warmup_steps: int = field(default=2, metadata={"help": "Steps not counted."})
    measured_steps: int = field(default=5, metadata={"help": "Steps whose median is reported."})
    trl: bool = field(default=True, metadata={"help": "Also run TRL's DPOTrainer and RLOOTrainer (--no_trl: skip)."})
    quick: bool = field(default=False, metadata={
        "help": "One warm-up and one measured step, completions of 8 tokens (checks the wiring, e.g. on a tiny "
                "--model_name_or_path; the numbers mean nothing)."})
    output: str = field(default="bench/bench_results.json", metadata={"help": "JSON results (a .md table beside it)."})
    weights_changed: bool = field(default=False, metadata={
        "help": "Also train 12 DPO steps with float32 weights (default mixed precision) and with bfloat16 weights, "
                "and report the fraction of weight elements that changed."})
    vllm: bool = field(default=False, metadata={
        "help": "Also time the online sampling through a vLLM server, weight push included (the server at "
                "--vllm_server_base_url, else one started from .venv-vllm: scripts/setup-vllm-cpu.sh), against "
                "transformers' generate on the same prompts; implied by --vllm_server_base_url."})
    random_model: str | None = field(default=None, metadata={
        "help": "Time a randomly initialized Llama of this shape instead of --model_name_or_path: 1b (TinyLlama-1.1B "
                "shape) or 135m (SmolLM2-135M shape), with the embedded tokenizer. Offline; speed only."})


def bench_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser((BenchOptions, HyPOConfig), prog="hypo bench", description=__doc__.split("\n\n")[0] +
                            " The workload takes every hypo train option (defaults: the default training run).")


def run_bench(argv: list[str]) -> int:
    options, config = bench_parser().parse_args_into_dataclasses(argv)
    if options.random_model:
        config = replace(config, model_name_or_path=str(make_random_llama(options.random_model)))
    settings = BenchSettings(config=replace(config, eval_at_end=False), warmup_steps=options.warmup_steps,
                             measured_steps=options.measured_steps, trl=options.trl,
                             weights_changed=options.weights_changed,
                             vllm=options.vllm or config.vllm_server_base_url is not None)
    if options.quick:
        settings.warmup_steps, settings.measured_steps, settings.fewer_prompts = 1, 1, (1,)
        settings.config = replace(settings.config, max_completion_length=8)
    bench(settings, Path(options.output))
    print(Path(options.output).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":  # a child process of `bench`: one variant, one JSON line
    import logging

    logging.basicConfig(level=logging.WARNING)
    variant, settings_json = sys.argv[1:3]
    print(RESULT_PREFIX + json.dumps(run_variant(variant, BenchSettings.from_json(settings_json))), flush=True)
