"""`hypo bench`: our DPO and HyPO next to TRL's DPOTrainer and RLOOTrainer, in one run.

Every variant trains the same model on the same pairs and prompts with the same batch shape, lengths,
learning rate and seed, in its own process (so each has its own peak memory, and none slows another),
one after the other. Each reports the median seconds per optimizer step after warm-up steps and its
peak resident memory. A first process measures the machine: fp32 matmul FLOP/s, copy bandwidth, one
decoding step of sampled generation at the online batch size, and a plain forward+backward of the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hypo.bench.results import markdown, ratios
from hypo.bench.settings import RESULT_PREFIX, BenchSettings
from hypo.bench.variants import variants
from hypo.config import HyPOConfig


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

    from hypo.models.gguf import cache_dir
    from hypo.models.loading import load_tokenizer, resolve_model_path

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
    fewer_prompts: str = field(default="2,1", metadata={
        "help": "Also run HyPO with these numbers of online prompts per micro-step, comma-separated ('' for none)."})
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
                             vllm=options.vllm or config.vllm_server_base_url is not None,
                             fewer_prompts=tuple(int(n) for n in options.fewer_prompts.split(",") if n.strip()))
    if options.quick:
        settings.warmup_steps, settings.measured_steps, settings.fewer_prompts = 1, 1, (1,)
        settings.config = replace(settings.config, max_completion_length=8)
    bench(settings, Path(options.output))
    print(Path(options.output).with_suffix(".md").read_text())
    return 0


