"""Ratios of a bench run against floors, TRL and targets, and its markdown table.

The floor of a step (what the hardware cannot beat): training work 6 x params x tokens and reference work
2 x params x tokens at the measured matmul rate, plus one read of the weights per decoding step at the
measured bandwidth. Ratios: our DPO / TRL DPO, our HyPO / (TRL DPO + TRL RLOO), HyPO / its floor,
a decoding step / its weight-read floor, forward+backward FLOP/s / matmul FLOP/s, HyPO / DPO peak memory,
and HyPO / DPO step time with fewer online prompts per step.
"""

from __future__ import annotations

from typing import Any

from hypo.bench.settings import BenchSettings

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


def meets_target(name: str, value: float, device: str = "cpu") -> str:
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
    lines += [f"| {name} | {value:.2f} | {meets_target(name, value, machine.get('device', 'cpu'))} |"
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


