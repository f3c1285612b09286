"""`hypo plan`: the peak GPU memory of a `hypo train` run, by part, before launch; exit status 1 when it does not
fit, with the options that would make it fit.

    hypo plan --config recipes/ultrafeedback-llama3-8b/hypo-lora.yaml --accelerate_config recipes/accelerate/1gpu.yaml
"""

from __future__ import annotations

import argparse
import json


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypo plan", add_help=False,
        description="Peak memory per GPU of a `hypo train` run (the same --config and options), by part and phase, "
                    "for a launch given by an accelerate config file or the flags below. Exit status 1 when it "
                    "does not fit, with the options that would make it fit.")
    parser.add_argument("--accelerate_config", help="accelerate config file of the launch (GPUs and sharding).")
    parser.add_argument("--num_gpus", type=int, help="GPUs (processes); overrides the accelerate config's.")
    parser.add_argument("--sharding", choices=("none", "ddp", "fsdp2", "zero3"),
                        help="how the model is spread over the GPUs; overrides the accelerate config's.")
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU in GB (default 80).")
    parser.add_argument("--headroom_gb", type=float,
                        help="GB left free for the CUDA context, NCCL buffers and fragmentation (default 10%% of a GPU).")
    parser.add_argument("--shape_from", help="take the model's shapes from this hub id or folder instead of "
                        "model_name_or_path (e.g. before an SFT step has written the model).")
    parser.add_argument("--decode_step_seconds", type=float, default=0.03,
                        help="seconds per decoding step, for the evaluation's duration (default 0.03: an 8B model "
                        "with generate on an H100, the recipes' assumption).")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON.")
    return parser


def run_plan(argv: list[str]) -> int:
    from hypo.cli.train import parse_train_args, train_parser
    from hypo.planning.advice import advise
    from hypo.planning.launch import launch_from_accelerate_config
    from hypo.planning.memory import Launch, memory_plan
    from hypo.planning.report import format_plan
    from hypo.planning.shapes import model_shape

    if "-h" in argv or "--help" in argv:
        plan_parser().print_help()
        print("\nrun options (as `hypo train`):")
        train_parser().print_help()
        return 0
    args, rest = plan_parser().parse_known_args(argv)
    config = parse_train_args(rest)
    if args.accelerate_config:
        launch = launch_from_accelerate_config(args.accelerate_config, gpu_memory_gb=args.gpu_memory_gb)
    else:
        launch = Launch(num_gpus=args.num_gpus or 1, gpu_memory_gb=args.gpu_memory_gb, sharding="none")
    if args.num_gpus or args.sharding:
        sharding = args.sharding or (launch.sharding if launch.sharding != "none" else "ddp")
        launch = Launch(num_gpus=args.num_gpus or launch.num_gpus, gpu_memory_gb=launch.gpu_memory_gb,
                        sharding=sharding if (args.num_gpus or launch.num_gpus) > 1 else "none",
                        source=launch.source if args.accelerate_config else "flags")
    if launch.num_gpus < 1 or launch.gpu_memory_gb <= 0:
        raise ValueError("--num_gpus must be >= 1 and --gpu_memory_gb > 0")
    shape = model_shape(args.shape_from or config.model_name_or_path, None if args.shape_from else config.gguf_file)
    plan = memory_plan(config, shape, launch, headroom_gb=args.headroom_gb)
    advice = None if plan.fits else advise(config, plan, launch)
    if args.json:
        print(json.dumps({"fits": plan.fits, "peak_gb": plan.peak / 1e9, "peak_phase": plan.peak_phase,
                          "usable_gb": plan.usable / 1e9, "launch": vars(launch),
                          "phases_gb": {phase: {k: v / 1e9 for k, v in parts.items()}
                                        for phase, parts in plan.phases.items()},
                          "host_gb": {k: v / 1e9 for k, v in plan.host.items()}, "notes": plan.notes,
                          "fixes": [flags for _, flags, _ in advice.alone] if advice else [],
                          "fixes_together": advice.together_flags if advice else ""}, indent=2))
    else:
        print(format_plan(plan, advice, decode_step_seconds=args.decode_step_seconds))
    return 0 if plan.fits else 1
