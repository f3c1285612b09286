"""Measurements of the machine in the bench's own process: matmul rate, memory bandwidth, a decoding step, a
plain forward+backward, and the fraction of weights an optimizer step changes."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace

from hypo.bench.settings import BenchSettings, median_after_warmup


def bench_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure_matmul(n: int = 2048, repeats: int = 10, dtype=None) -> float:
    """Matmul FLOP/s on the bench device (median of `repeats`): fp32 on a CPU, `dtype` (the training
    compute precision) on a GPU."""
    import torch

    a = torch.randn(n, n, device=bench_device(), dtype=dtype)
    b = torch.randn(n, n, device=bench_device(), dtype=dtype)
    a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b) for _ in range(repeats))


def measure_copy_bandwidth(megabytes: int = 512, repeats: int = 8) -> float:
    """Bytes read + written per second by a large tensor copy (median of `repeats`)."""
    import torch

    source = torch.randn(megabytes * 2**20 // 4, device=bench_device())
    target = torch.empty_like(source)
    target.copy_(source)
    return 2 * source.numel() * 4 / statistics.median(timed(lambda: target.copy_(source)) for _ in range(repeats))


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 8) -> float:
    """Bytes read per second by a sum over a large tensor (median of `repeats`): a check on the copy figure."""
    import torch

    source = torch.randn(megabytes * 2**20 // 4, device=bench_device())
    source.sum()
    return source.numel() * 4 / statistics.median(timed(lambda: source.sum()) for _ in range(repeats))


def measure_machine(settings: BenchSettings) -> dict[str, float]:
    """Matmul rate, copy bandwidth, a decoding step at the online batch size and a plain forward+backward,
    on the bench device, at the training compute precision (bf16 autocast on GPUs by default)."""
    import torch

    from hypo.data.batches import PromptCollator
    from hypo.data.encoding import load_prompt_data
    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.runtime.precision import resolve_mixed_precision
    from hypo.sampling.generate import resolve_cache_implementation, sampling_kwargs
    from hypo.tasks import get_task

    config, device = settings.config, bench_device()
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
            return timed(lambda: model.generate(input_ids=batch["prompt_input_ids"],
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

    fwd_bwd = median_after_warmup([timed(forward_backward) for _ in range(4)], 1)
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

    from hypo.models.loading import resolve_model_path
    from hypo.training.trainer import train

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


