"""Ratios of a bench run against floors, TRL and targets, and its markdown table.

The floor of a step (what the hardware cannot beat): training work 6 x params x tokens and reference work
2 x params x tokens at the measured matmul rate, plus per decoding step one read of the weights at the
measured bandwidth or its 2 x params FLOPs per sampled row, whichever is longer. Ratios: our DPO / TRL DPO,
our HyPO / (TRL DPO + TRL RLOO), HyPO / its floor, a decoding step / its weight-read floor, forward+backward
FLOP/s / matmul FLOP/s, HyPO / DPO peak memory, HyPO / DPO step time (also with fewer online prompts per
step), the sampling's share of the HyPO step, one sampling call per micro-step against one per optimizer
step, and vLLM server mode without / with overlap.
"""

from __future__ import annotations

from typing import Any

from hypo.bench.settings import BenchSettings

TARGETS = {
    "cpu": {
        "dpo_vs_trl_dpo": ("<=", 0.8),
        "hypo_vs_trl_dpo_plus_rloo": ("<=", 0.6),
        "hypo_vs_dpo_step": ("<=", 2.5),  # set for gradient_accumulation_steps 4 (one online batch per pair batch)
        "hypo_generation_share": ("<=", 0.2),
        "hypo_vs_floor": ("<=", 1.5),
        "decode_step_vs_floor": ("<=", 2.0),
        "forward_backward_vs_matmul": (">=", 0.7),
        "hypo_vs_dpo_peak_memory": ("<=", 1.2),
    },
    "cuda": {
        "dpo_vs_trl_dpo": ("<=", 0.7),
        "hypo_vs_trl_dpo_plus_rloo": ("<=", 0.3),
        "hypo_vs_dpo_step": ("<=", 2.0),
        "decode_step_vs_floor": ("<=", 3.0),
        "hypo_vs_dpo_peak_memory": ("<=", 1.2),
    },
}
"""Targets of the ratios by device: the same command compares against TRL on a CPU or a GPU."""


def hypo_floor_seconds(hypo: dict[str, Any], machine: dict[str, float]) -> float:
    """Training (6N) and reference (2N) FLOPs of the step's distinct tokens (each prompt once) at the
    matmul rate, plus per decoding step the larger of one read of the weights at the copy bandwidth (bytes
    read and written per second by a large copy) and the step's 2N FLOPs per sampled row at the matmul rate
    (which passes the weight read once a sampling call holds enough rows)."""
    compute = 8 * machine["params"] * hypo["tokens_per_step"] / machine["matmul_flops"]
    decode_step = max(machine["decode_step_floor_seconds"],
                      2 * machine["params"] * hypo.get("samples_per_call", 0) / machine["matmul_flops"])
    return compute + hypo["decode_steps"] * decode_step


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
        "hypo_generation_share": hypo["time/generation"] / hypo["time/step"],
    }
    for name, result in results.items():
        if name.startswith("hypo-prompts"):
            out[f"{name}_vs_dpo_step"] = result["time/step"] / dpo["time/step"]
    if "hypo-sample-per-micro-step" in results:  # one sampling call per micro-step / one per optimizer step
        out["hypo_sample_per_micro_step_vs_hypo"] = results["hypo-sample-per-micro-step"]["time/step"] / hypo["time/step"]
    if "hypo-vllm-server" in results and "hypo-vllm-server-no-overlap" in results:
        out["hypo_vllm_server_no_overlap_vs_overlap"] = (results["hypo-vllm-server-no-overlap"]["time/step"]
                                                         / results["hypo-vllm-server"]["time/step"])
    if "trl-dpo" in results:
        out["dpo_vs_trl_dpo"] = dpo["time/step"] / results["trl-dpo"]["time/step"]
    if "vllm-sampling" in results:  # a sampling step with vLLM (weight push + generation) / transformers' generate
        vllm = results["vllm-sampling"]
        out["vllm_vs_transformers_sampling"] = vllm["time/step"] / vllm["time/generation_transformers"]
    if "trl-dpo" in results and "trl-rloo" in results:
        out["hypo_vs_trl_dpo_plus_rloo"] = hypo["time/step"] / (
            results["trl-dpo"]["time/step"] + results["trl-rloo"]["time/step"])
    return out


def sampling_table(result: dict[str, Any]) -> str:
    """The `sampling-by-batch` variant as a markdown table."""
    rows = ["| samples per call | prompt prefilled | seconds | ms per sample | decoding steps | ms per decoding step |",
            "|---|---|---|---|---|---|"]
    for once, entries in ((True, result["by_batch"]), (False, result.get("prompt_prefilled_k_times", []))):
        rows += [f"| {e['samples']} | {'once' if once else 'k times'} | {e['seconds']:.2f} | "
                 f"{e['seconds_per_sample'] * 1e3:.0f} | {e['decode_steps']:.0f} | {e['seconds_per_decode_step'] * 1e3:.0f} |"
                 for e in entries]
    return "\n".join(rows)


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
        f"{config.num_generations} samples of up to {config.max_completion_length} tokens per micro-step, "
        f"{config.gradient_accumulation_steps} micro-step(s) per optimizer step, sampled "
        f"{config.steps_per_generation or config.gradient_accumulation_steps} micro-step(s) per call; "
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
        if name in ("machine", "weights-changed", "vllm-sampling", "sampling-by-batch"):
            continue
        parts = [f"{r[k]:.3f}" if k in r else "" for k in
                 ("time/step", "time/generation", "time/reference", "time/forward_backward", "time/optimizer",
                  "peak_rss_gb", "peak_gpu_gb")]
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {meets_target(name, value, machine.get('device', 'cpu'))} |"
              for name, value in computed.items()]
    if "sampling-by-batch" in results:
        lines += ["", sampling_table(results["sampling-by-batch"])]
    if "hypo-vllm-server" in results:
        cores = results["hypo-vllm-server"].get("cores", "")
        lines += ["", f"hypo-vllm-server(-no-overlap): our loop sampling through a vLLM server, with and without "
                  f"vllm_server_overlap (cores: {cores})."]
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


