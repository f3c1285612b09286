"""Estimated GPU hours of the recipes in recipes/, from the assumptions below (no GPU measured them).

Run: python scripts/estimate_recipes.py   (prints the markdown table of recipes/README.md)

Model of a run: training work is 6 x params FLOPs per token for the policy's forward and backward (LoRA keeps
the backward through the activations, so also about 6x) plus 2 x params per token for the reference's forward,
and 2 x params more with gradient checkpointing (the forward is run again in the backward);
each prompt is counted once (hypo runs a prompt once for its completions); one epoch, so every pair's reference
log-probs are computed once. It runs at PEAK x MFU. HyPO adds, per optimizer step and GPU, its sampling calls
(one per optimizer step by default, `steps_per_generation`; before, one per micro-step), each as long as the
longest sample of the call (assumed: the length cap) at a time per decoding step that depends on the rows of the
call (`decode_step_seconds`), and the scoring of its samples (training + reference work on prompt + samples).
GPUs scale linearly (DDP).

A decoding step of transformers' `generate` costs a fixed part (kernel launches and weight reads, the same at
any small batch) plus a part per row (the row's 2 x params FLOPs and the read of its keys and values). The
shape was measured on a CPU (docs/performance.md, `hypo bench`'s sampling-by-batch variant: SmolLM2-135M,
fp32, 2 cores: 76-78 ms per step at 8 rows, 96 at 16, 141 at 32, 241 at 64, i.e. about 48 ms + 3 ms per row).
On a GPU only the fixed part is anchored on a measurement: 18.6 ms per step for a 1.1B model at 8 rows with
hypo's decoding loop on an H100 (docs/design.md: performance); larger models assumed a little slower (weight
reads grow, but the loop is launch-bound at these sizes), an A100 1.3x slower. The per-row part on a GPU is
arithmetic, not measured: 2 x params FLOPs at PEAK x MFU plus the row's keys and values (its prompt and half
the sample cap) at 70% of the memory bandwidth, added to the fixed part (no overlap assumed).
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_BF16 = {"H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM, vendor figures)
MEMORY_BANDWIDTH = {"H100": 3.35e12, "A100": 2.0e12}  # bytes/s (H100 SXM, A100 80GB; vendor figures)
MFU = 0.30  # assumed fraction of the peak reached by training matmuls under bf16 autocast (20-40% is typical)
DECODE_FIXED_SECONDS = {"1.4b": 0.020, "2.8b": 0.025, "8b": 0.030}
"""The fixed part of a decoding step of transformers' generate on an H100 (see the module docstring)."""
KV_BYTES_PER_TOKEN = {"1.4b": 2 * 24 * 2048 * 2, "2.8b": 2 * 32 * 2560 * 2, "8b": 2 * 32 * 8 * 128 * 2}
"""bf16 keys and values per token: Pythia 1.4B (24 layers x 2048), 2.8B (32 x 2560), Llama-3-8B (32 layers x
8 key-value heads x 128)."""


@dataclass
class Setting:
    name: str
    params: float
    size: str
    rows: int  # pairs (or SFT examples) in one epoch
    batch: int  # rows per optimizer step, all GPUs
    prompt_tokens: int  # assumed mean
    completion_tokens: int  # assumed mean of one offline completion (SFT: the completion)
    sample_cap: int  # max_completion_length: HyPO samples stop there at the latest
    sample_tokens: int  # assumed mean sample length
    prompts_per_micro_step: int  # HyPO's per_device_prompt_batch_size
    micro_steps: dict[int, int]  # GPUs -> micro-steps per optimizer step per GPU (gradient accumulation)
    num_generations: int = 2  # k samples per online prompt
    flops_per_param_token: int = 8  # policy forward + backward (6), reference forward (2); + 2 recomputed forward


UF = dict(rows=61_135, batch=128, prompt_tokens=200, completion_tokens=350, sample_cap=512, sample_tokens=350,
          prompts_per_micro_step=1)


TLDR = dict(rows=92_858, batch=64, prompt_tokens=400, completion_tokens=35, sample_cap=64, sample_tokens=40)
SETTINGS = [
    Setting("TL;DR, Pythia 1.4B", 1.41e9, "1.4b", **TLDR, prompts_per_micro_step=8, micro_steps={1: 8, 8: 1}),
    Setting("TL;DR, Pythia 2.8B", 2.78e9, "2.8b", **TLDR, prompts_per_micro_step=4, micro_steps={1: 16, 8: 2}),
    Setting("UltraFeedback, Llama-3-8B-Instruct, LoRA", 8.03e9, "8b", **UF, micro_steps={1: 32, 8: 4}),
    Setting("UltraFeedback, Llama-3-8B-Instruct, full (FSDP2 / ZeRO-3)", 8.03e9, "8b", **UF, micro_steps={8: 4},
            flops_per_param_token=10),
]
SFT = [("TL;DR SFT, Pythia 1.4B", 1.41e9, 116_722, 435), ("TL;DR SFT, Pythia 2.8B", 2.78e9, 116_722, 435)]
"""(name, params, examples, assumed tokens per example)"""


def hours(flops: float, gpus: int, gpu: str) -> float:
    return flops / (PEAK_BF16[gpu] * MFU * gpus) / 3600


def decode_step_seconds(s: Setting, rows: int, gpu: str) -> float:
    """One decoding step of a sampling call of `rows` rows: the fixed part plus `rows` times the per-row part."""
    fixed = DECODE_FIXED_SECONDS[s.size] * (1.0 if gpu == "H100" else 1.3)
    context = s.prompt_tokens + s.sample_cap / 2  # mean tokens a row attends to over the call
    per_row = 2 * s.params / (PEAK_BF16[gpu] * MFU) + KV_BYTES_PER_TOKEN[s.size] * context / (0.7 * MEMORY_BANDWIDTH[gpu])
    return fixed + rows * per_row


def estimates(s: Setting, gpus: int, gpu: str, *, calls_per_step: int = 1) -> tuple[float, float]:
    """(DPO hours, HyPO hours) for one epoch on `gpus` GPUs of kind `gpu`, with `calls_per_step` sampling calls
    per optimizer step and GPU (1: one call per optimizer step; the micro-steps: one call per micro-step)."""
    dpo_flops = s.rows * (s.prompt_tokens + 2 * s.completion_tokens) * s.flops_per_param_token * s.params
    steps = s.rows / s.batch
    prompts = steps * s.prompts_per_micro_step * s.micro_steps[gpus] * gpus
    scoring_flops = prompts * (s.prompt_tokens + 2 * s.sample_tokens) * s.flops_per_param_token * s.params
    rows_per_call = s.prompts_per_micro_step * s.num_generations * s.micro_steps[gpus] // calls_per_step
    generation_hours = steps * calls_per_step * s.sample_cap * decode_step_seconds(s, rows_per_call, gpu) / 3600
    dpo = hours(dpo_flops, gpus, gpu)
    return dpo, dpo + hours(scoring_flops, gpus, gpu) + generation_hours


def main() -> None:
    print("| setting | GPUs | DPO (h) | HyPO (h) | HyPO, one sampling call per micro-step (h) |")
    print("| --- | --- | --- | --- | --- |")
    for s in SETTINGS:
        for gpus in (g for g in (8, 1) if g in s.micro_steps):
            for gpu in ("H100", "A100"):
                dpo, hypo = estimates(s, gpus, gpu)
                _, per_micro_step = estimates(s, gpus, gpu, calls_per_step=s.micro_steps[gpus])
                print(f"| {s.name} | {gpus} x {gpu} 80GB | {dpo:.1f} | {hypo:.1f} | {per_micro_step:.1f} |")
    for name, params, examples, tokens in SFT:
        for gpus, gpu in ((8, "H100"), (1, "H100"), (8, "A100")):
            print(f"| {name} | {gpus} x {gpu} 80GB | {hours(examples * tokens * 6 * params, gpus, gpu):.2f} (SFT) | | |")


if __name__ == "__main__":
    main()
