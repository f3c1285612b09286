"""Estimated GPU hours of the recipes in recipes/, from the assumptions below (no GPU measured them).

Run: python scripts/estimate_recipes.py   (prints the markdown table of recipes/README.md)

Model of a run: training work is 6 x params FLOPs per token for the policy's forward and backward (LoRA keeps
the backward through the activations, so also about 6x) plus 2 x params per token for the reference's forward,
and 2 x params more with gradient checkpointing (the forward is run again in the backward);
each prompt is counted once (hypo runs a prompt once for its completions); one epoch, so every pair's reference
log-probs are computed once. It runs at PEAK x MFU. HyPO adds, per optimizer step and GPU, one generation call
per micro-step, each as long as the longest sample (assumed: the length cap) at a fixed time per decoding step,
and the scoring of its samples (training + reference work on prompt + samples). GPUs scale linearly (DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_BF16 = {"H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM, vendor figures)
MFU = 0.30  # assumed fraction of the peak reached by training matmuls under bf16 autocast (20-40% is typical)
DECODE_STEP_SECONDS = {"1.4b": 0.020, "2.8b": 0.025, "8b": 0.030}
"""Per decoding step of transformers' generate (batch of one micro-step), on an H100. Anchor: 18.6 ms measured
for a 1.1B model with hypo's plain decoding loop (docs/design.md: performance); larger models assumed a little slower
(weight reads grow, but the loop is launch-bound at these sizes). An A100 is assumed 1.3x slower per step."""


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


def estimates(s: Setting, gpus: int, gpu: str) -> tuple[float, float]:
    """(DPO hours, HyPO hours) for one epoch on `gpus` GPUs of kind `gpu`."""
    dpo_flops = s.rows * (s.prompt_tokens + 2 * s.completion_tokens) * s.flops_per_param_token * s.params
    steps = s.rows / s.batch
    prompts = steps * s.prompts_per_micro_step * s.micro_steps[gpus] * gpus
    scoring_flops = prompts * (s.prompt_tokens + 2 * s.sample_tokens) * s.flops_per_param_token * s.params
    step_seconds = DECODE_STEP_SECONDS[s.size] * (1.0 if gpu == "H100" else 1.3)
    generation_hours = steps * s.micro_steps[gpus] * s.sample_cap * step_seconds / 3600
    dpo = hours(dpo_flops, gpus, gpu)
    return dpo, dpo + hours(scoring_flops, gpus, gpu) + generation_hours


def main() -> None:
    print("| setting | GPUs | DPO (h) | HyPO (h) |")
    print("| --- | --- | --- | --- |")
    for s in SETTINGS:
        for gpus in (g for g in (8, 1) if g in s.micro_steps):
            for gpu in ("H100", "A100"):
                dpo, hypo = estimates(s, gpus, gpu)
                print(f"| {s.name} | {gpus} x {gpu} 80GB | {dpo:.1f} | {hypo:.1f} |")
    for name, params, examples, tokens in SFT:
        for gpus, gpu in ((8, "H100"), (1, "H100"), (8, "A100")):
            print(f"| {name} | {gpus} x {gpu} 80GB | {hours(examples * tokens * 6 * params, gpus, gpu):.2f} (SFT) | |")


if __name__ == "__main__":
    main()
