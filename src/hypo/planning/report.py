"""A memory plan as people read it: the run, a table of GB per part and phase, the verdict, host needs, notes."""

from __future__ import annotations

from hypo.planning.advice import Advice
from hypo.planning.memory import PARTS, Plan, evaluation_decoding_steps


def gb(value: float) -> str:
    return f"{value / 1e9:.1f}"


def describe_run(plan: Plan) -> list[str]:
    config, shape, launch = plan.config, plan.shape, plan.launch
    gpus = f"{launch.num_gpus} x {launch.gpu_memory_gb:g} GB GPU{'s' if launch.num_gpus > 1 else ''}"
    sharding = {"none": "one process", "ddp": "data parallel (DDP)", "fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}
    trained = (f"LoRA r {config.lora_r} ({shape.lora_params(config.lora_r, config.lora_target_modules) / 1e6:.0f}M "
               "trained)" if config.use_peft else "full fine-tuning")
    sampling = ""
    if config.method == "hypo":
        sampling = f", samples from {'vLLM ' + config.vllm_mode if config.use_vllm else 'generate'}"
    return [
        f"{config.method} on {shape.name} ({shape.params / 1e9:.2f}B parameters, {shape.model_type}), {trained}",
        f"launch: {gpus}, {sharding[launch.sharding]} ({launch.source}){sampling}",
        f"weights {config.dtype}, compute {'float32' if config.mixed_precision == 'no' else 'bf16'}, gradient "
        f"checkpointing {'on' if config.gradient_checkpointing else 'off'}, attention "
        f"{config.attn_implementation or 'sdpa'}, logits {'fused (TRL)' if config.fused_lm_head else 'full'}",
    ]


def plan_table(plan: Plan) -> list[str]:
    """Markdown: one row per part that is not zero everywhere, one column per phase, the totals."""
    phases = list(plan.phases)
    lines = ["| GB per GPU | " + " | ".join(phases) + " |", "| --- |" + " ---: |" * len(phases)]
    for part in PARTS:
        if any(plan.phases[phase][part] for phase in phases):
            lines.append(f"| {part} | " + " | ".join(gb(plan.phases[phase][part]) for phase in phases) + " |")
    lines.append("| **total** | " + " | ".join(f"**{gb(plan.total(phase))}**" for phase in phases) + " |")
    return lines


def verdict(plan: Plan) -> str:
    usable = plan.usable
    word = "fits" if plan.fits else "does NOT fit"
    return (f"peak {gb(plan.peak)} GB per GPU ({plan.peak_phase}) of {gb(usable)} GB usable "
            f"({plan.launch.gpu_memory_gb:g} GB less {gb(plan.launch.gpu_memory_gb * 1e9 - usable)} GB headroom for "
            f"the CUDA context, NCCL and fragmentation): {word}")


def timing_lines(plan: Plan, decode_step_seconds: float) -> list[str]:
    """The main process's evaluation time against the collective timeout (the other processes wait meanwhile)."""
    config = plan.config
    if plan.launch.num_gpus < 2 or not (config.eval_at_end or config.eval_steps):
        return []
    steps = evaluation_decoding_steps(config)
    if not steps:
        return ["evaluation: eval_max_prompts 0 (all prompts): its length depends on the data; keep "
                f"ddp_timeout ({config.ddp_timeout} s) above its time"]
    seconds = steps * decode_step_seconds
    line = (f"evaluation on the main process: {steps} decoding steps, about {seconds / 60:.1f} min at "
            f"{decode_step_seconds * 1e3:.0f} ms per step (--decode_step_seconds), while the other processes wait; "
            f"ddp_timeout {config.ddp_timeout} s")
    if seconds > 0.5 * config.ddp_timeout:
        line += f": raise --ddp_timeout to at least {int(3 * seconds)}"
    return [line]


def format_plan(plan: Plan, advice: Advice | None = None, *, decode_step_seconds: float = 0.03) -> str:
    lines = ["hypo plan: " + describe_run(plan)[0], *("  " + line for line in describe_run(plan)[1:]), ""]
    lines += plan_table(plan) + ["", verdict(plan)]
    if plan.host:
        lines += ["", "host memory (outside the GPUs):"]
        lines += [f"  {name}: {gb(value)} GB" for name, value in plan.host.items()]
    timing = timing_lines(plan, decode_step_seconds)
    if timing:
        lines += [""] + timing
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in plan.notes]
    if advice is not None and not plan.fits:
        lines += [""]
        if advice.alone:
            lines += ["each of these alone makes it fit:"]
            lines += [f"  {flags}  -> {gb(p.peak)} GB ({change.name}: {change.cost})"
                      for change, flags, p in advice.alone]
        if not advice.alone and advice.together and advice.together_plan is not None:
            names = ", ".join(change.name for change in advice.together)
            lines += [f"together ({names}): {advice.together_flags}  -> {gb(advice.together_plan.peak)} GB"]
        if not advice.alone and not advice.together:
            lines += ["none of hypo's memory options makes it fit: shard the model (FSDP2 over more GPUs), use LoRA, "
                      "or shorten max_length / max_completion_length"]
    return "\n".join(lines)
