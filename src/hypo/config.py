"""Typed configuration of `hypo train`, its validation, and loading from YAML/JSON with CLI overrides.

Field names follow TRL where the concept is the same (docs/design.md: names); `kl_coef` is the paper's
lambda, the weight of the online reverse-KL term, and never shares a name with DPO's `beta`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
"""Name that selects the embedded SmolLM2-135M-Instruct (also used when no model is given)."""


LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""The offline loss types: TRL 1.16 DPOTrainer's, formulas in `hypo.objective.pair_losses`."""
LABEL_SMOOTHING_LOSSES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})
"""The loss types that read label_smoothing (TRL 1.16's sigmoid does not: hypo's is conservative DPO)."""
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
"""The loss types built on the chosen-rejected difference, where the f-DPO reparameterization holds (TRL's list)."""


def _help(text: str, default: Any = None, **kw) -> Any:
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class HyPOConfig:
    """Everything one `hypo train` run needs. Saved as `config.json` beside the results."""

    # --- method -----------------------------------------------------------------------------------------
    method: Literal["hypo", "dpo"] = _help(
        "hypo: DPO loss on the offline pairs + kl_coef * reverse KL on fresh policy samples; dpo: offline only.",
        "hypo")
    beta: float = _help("DPO temperature beta: implicit reward = beta * (logp_policy - logp_ref).", 0.1)
    loss_type: str | list[str] = field(default_factory=lambda: "sigmoid", metadata={"help": (  # a factory: the
        # command line's list parser reads no plain default
        "Offline loss on the pairs, TRL DPOTrainer's loss_type: sigmoid (DPO), hinge, ipo (on per-token average "
        "log-ratios, as TRL), exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, "
        "discopop, sft, sigmoid_norm; several (--loss_type sigmoid sft) are summed with loss_weights. With method "
        "hypo the online KL term adds to it.")})
    loss_weights: list[float] | None = _help(
        "Weight of each loss_type in the sum, in the same order (for example --loss_type sigmoid sft "
        "--loss_weights 1 0.2); default 1 each.")
    label_smoothing: float = _help(
        "Assumed label-flip probability, in [0, 0.5): conservative DPO for sigmoid (TRL 1.16's sigmoid ignores it), "
        "and TRL's meaning for robust, exo_pair (needs > 0; the EXO paper suggests 1e-3), aot and aot_unpaired.", 0.0)
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = _help(
        "f-DPO's divergence to the reference (TRL's f_divergence_type): reverse_kl is DPO's own; the others apply "
        "to sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft. Not the online term, which is "
        "always the reverse KL.", "reverse_kl")
    f_alpha_divergence_coef: float = _help("alpha of f_divergence_type alpha_divergence.", 0.5)
    discopop_tau: float = _help("Temperature tau of loss_type discopop (the DiscoPOP paper's default 0.05).", 0.05)
    ld_alpha: float | None = _help(
        "LD-DPO (TRL's ld_alpha), in [0, 1]: in each pair, the tokens of the longer completion beyond the shorter "
        "one's length count ld_alpha times in the log-probs of policy and reference. Default: off (every token "
        "counts once).")
    kl_coef: float = _help(
        "HyPO's lambda: weight of the online reverse-KL term KL(pi || pi_ref) (arXiv 2406.01462).", 0.05)
    num_generations: int = _help(
        "k: completions sampled per unlabeled prompt; k >= 2 enables the leave-one-out baseline.", 2)
    per_device_prompt_batch_size: int = _help("Unlabeled prompts per micro-step for the online KL term.", 4)
    steps_per_generation: int | None = _help(
        "Micro-steps whose online prompts are sampled together, in one generation call (TRL's GRPO/RLOO name); it "
        "must divide gradient_accumulation_steps. Default: gradient_accumulation_steps, one call per optimizer step "
        "(a decoding step reads all the weights whatever the batch, so larger calls cost less per sample). The "
        "samples stay exact draws from the current policy: the weights do not change inside an optimizer step, and "
        "samples are never reused across optimizer steps (they would come from older weights).")
    max_completion_length: int = _help(
        "Longest completion in tokens: offline completions are truncated to it, samples stop at it.", 64)
    cache_implementation: Literal["auto", "dynamic", "static"] = _help(
        "Decoding cache of the online and evaluation samples (as in TRL's GRPOConfig): dynamic grows it step by "
        "step; static preallocates it, and on CUDA transformers then compiles the decoding step; auto: static on "
        "CUDA, dynamic elsewhere. It changes speed, not the sampled distribution.", "auto")
    eval_temperature: float = _help(
        "Sampling temperature of the judged completions in evaluations (policy and baseline). Never used for "
        "the online KL samples, which come from the policy itself at temperature 1; when it is not 1, the "
        "evaluation estimates the KL on separate temperature-1 samples.", 1.0)
    eval_top_p: float = _help(
        "Nucleus sampling of the judged completions in evaluations; the KL samples are never truncated.", 1.0)

    # --- vLLM sampling (the online KL samples; TRL's names) ----------------------------------------------
    use_vllm: bool = _help(
        "Sample the online KL completions with vLLM instead of transformers' generate (docs/vllm.md). The samples "
        "stay exact draws from the current policy (temperature 1, no truncation or penalties, every stop id of the "
        "model); the policy's weights go to the engine after each optimizer step. Evaluation samples still use "
        "generate. A server that fails stops the run with an error; there is no fallback.", False)
    vllm_mode: Literal["server", "colocate"] = _help(
        "server: a separate `vllm serve` process (other GPUs, or the CPU build), weights pushed through a shared "
        "folder; colocate: a vLLM engine inside each training process on its GPU (vllm installed beside hypo).",
        "colocate")
    vllm_server_base_url: str | None = _help(
        "Server mode: URL of the vLLM server, started with VLLM_SERVER_DEV_MODE=1 (default http://127.0.0.1:8000).")
    vllm_server_timeout: float = _help(
        "Server mode: seconds to wait for the server to come up, and for each request to it.", 240.0)
    vllm_server_weights_dir: str | None = _help(
        "Server mode: folder where the policy's weights are written for the server to reload; the server must see "
        "it under the same path (default: a new folder in /dev/shm, for a server on this machine).")
    vllm_server_overlap: bool = _help(
        "Server mode: send each optimizer step's sampling request before the offline term's forward and backward "
        "and collect the samples when the online term needs them, so the server samples while the trainer "
        "computes. Exact: the server holds the weights pushed after the previous optimizer step, and every "
        "request of a step is answered before the next push.", True)
    vllm_gpu_memory_utilization: float = _help(
        "Colocate mode: fraction of the GPU's memory the vLLM engine takes (weights + KV cache); the training "
        "process keeps the rest. For a server, pass --gpu-memory-utilization to `vllm serve`.", 0.3)
    vllm_enable_sleep_mode: bool = _help(
        "Colocate mode: the engine sleeps after each sampling (vLLM's sleep mode, level 1: its weights go to CPU "
        "memory, its KV cache is freed) and wakes for the next push and sampling, so the backward passes get its "
        "share of the GPU back (TRL's name). Costs a copy of the engine's weights to the CPU and back per "
        "sampling (not measured here).", False)

    # --- model ------------------------------------------------------------------------------------------
    model_name_or_path: str = _help(
        "Policy to train: a hub id, a local folder, a .gguf file, or the embedded SmolLM2-135M-Instruct.",
        DEFAULT_MODEL)
    gguf_file: str | None = _help("GGUF file name inside model_name_or_path (a folder), if the model is GGUF.")
    ref_model_name_or_path: str | None = _help("Reference model; default: a frozen copy of the initial policy.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help(
        "Compute precision (accelerate's mixed_precision; --mixed_precision bf16 is Trainer's --bf16): the weights "
        "and optimizer stay float32 and the forward passes of policy and reference run under autocast. auto: bf16 "
        "on GPUs that support it, no on CPUs (bf16 matmuls are slower there). fp16 scales the loss (GPU only).",
        "auto")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _help(
        "Weights dtype. Keep float32 (with mixed_precision for speed): bfloat16 weights round most AdamW updates "
        "away (about 9 in 10 weights never change at learning rates near 1e-5), float16 weights are refused. With "
        "use_peft it is the frozen base's dtype: bfloat16 halves the base (16 GB instead of 32 at 8B) and spares "
        "autocast's bf16 copy of every weight; the trained adapters stay float32.",
        "float32")
    use_peft: bool = _help("Train LoRA adapters; the reference is then the base model with adapters disabled.", False)
    lora_r: int = _help("LoRA rank.", 16)
    lora_alpha: int = _help("LoRA alpha.", 32)
    lora_dropout: float = _help("LoRA dropout (0 keeps the log-probs deterministic).", 0.0)
    lora_target_modules: str = _help("Comma-separated module names, or all-linear.", "all-linear")
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory (slower).", False)
    attn_implementation: str | None = _help(
        "Attention kernel of the policy and the reference (transformers' attn_implementation: sdpa, eager, "
        "flash_attention_2, ...); default: transformers' choice (sdpa where the model supports it). eager keeps "
        "every layer's (heads, length, length) probabilities for the backward.")

    # --- data -------------------------------------------------------------------------------------------
    task: str = _help("Bundled task used when --dataset is not given (pairs, prompts, eval prompts, judge).",
                      "reviews")
    dataset: str | None = _help(
        "Preference pairs (prompt/chosen/rejected): a .jsonl/.json/.csv/.parquet file, a dataset folder or a hub name.")
    dataset_split: str = _help("Split of --dataset.", "train")
    prompts: str | None = _help(
        "Unlabeled prompts (prompt field) for the online term; default: the task's, or the prompts of --dataset.")
    prompts_split: str = _help("Split of --prompts.", "train")
    eval_prompts: str | None = _help("Held-out prompts for the end-of-run evaluation; default: the task's.")
    judge: str | None = _help("Judge for the win rate (a registered name); default: the task's gold judge.")
    skip_bad_rows: bool = _help("Drop invalid rows (and log how many) instead of stopping with an error.", False)
    max_length: int = _help("Longest prompt + completion in tokens for the offline pairs.", 256)
    max_prompt_length: int = _help("Prompts longer than this keep their last tokens.", 128)

    # --- optimization -----------------------------------------------------------------------------------
    learning_rate: float = _help("Peak AdamW learning rate.", 1e-5)
    per_device_train_batch_size: int = _help("Preference pairs per micro-step per process.", 4)
    gradient_accumulation_steps: int = _help("Micro-steps per optimizer step.", 1)
    max_steps: int = _help("Optimizer steps; -1 runs num_train_epochs over the pairs.", 30)
    num_train_epochs: float = _help("Epochs over the pairs when max_steps is -1.", 1.0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _help(
        "Learning-rate schedule after warmup.", "linear")
    warmup_ratio: float = _help("Fraction of the steps spent warming the learning rate up from 0.", 0.1)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", 1.0)
    share_prompt_forward: bool | None = _help(
        "Run each prompt once and score its completions (chosen and rejected, or its k samples) against the "
        "prompt's cached keys and values: the same log-probs and gradients for less compute. Default: on CPUs "
        "(DPO step 4.12 -> 3.60 s on 2 cores), off on GPUs (two small forwards cost more kernel launches than one: "
        "DPO 0.181 vs 0.096 s per step for a 1.1B model on an H100). Not used with gradient_checkpointing.")
    fused_lm_head: bool = _help(
        "Per-token log-probs through TRL's fused output layer (trl.trainer.add_fused_lm_head, TRL's DPOTrainer's "
        "way): the output layer runs on 4,096 positions x 32,768 words at a time in the forward and again in the "
        "backward, so the (rows, positions, vocabulary) logits never exist. The plain path keeps about 10 bytes "
        "per logit through the backward (float32 logits, their gradient): 5.3 GB for 8 rows x 513 positions at "
        "Llama 3's vocabulary of 128,256. Needs trl; not with share_prompt_forward.", False)
    group_by_length: bool = _help(
        "Batches of rows of similar length: each epoch's seeded order is cut into groups of 50 batches, each "
        "sorted by length (transformers' LengthGroupedSampler; the group with the longest row first), so batches "
        "carry less padding. Changes which rows train together (off: the order of earlier runs); resuming "
        "continues it exactly.", False)
    precompute_ref_log_probs: bool = _help(
        "Cache the reference log-probs of each offline pair the first time it is seen (the reference is frozen).",
        True)
    seed: int = _help("Seed for data order, sampling and initialization.", 42)

    # --- outputs ----------------------------------------------------------------------------------------
    output_dir: str | None = _help("Where to write config, metrics, checkpoints and the model; default runs/<method>-<time>.")
    logging_steps: int = _help("Write metrics every N optimizer steps.", 1)
    save_steps: int = _help("Save a checkpoint every N steps (0: only the final model). A checkpoint holds the "
                            "model in Hugging Face format and the full training state, so a run can resume from it.",
                            0)
    save_total_limit: int | None = _help("Keep only the newest N checkpoints (default: all).")
    resume_from_checkpoint: str | None = _help(
        "Continue a run from a checkpoint folder, or 'latest' (the newest in output_dir): the same run, into the "
        "same output_dir, with the same result as an uninterrupted run.")
    overwrite_output_dir: bool = _help(
        "Start a new run in an output_dir that holds one; the old run is moved aside to <output_dir>.previous-<time>, "
        "not deleted.", False)
    report_to: str = _help("Extra trackers, comma-separated: tensorboard, wandb, trackio, or none.", "none")
    eval_at_end: bool = _help("Evaluate on the held-out prompts after training.", True)
    eval_max_prompts: int = _help("Held-out prompts used by the end-of-run evaluation (0: all).", 64)
    eval_num_samples: int = _help("Completions per held-out prompt in the evaluation.", 2)
    eval_batch_size: int = _help("Prompts per generation batch in the evaluation.", 16)
    eval_steps: int = _help(
        "Also evaluate every N optimizer steps during training, on the main process, logged as eval_* (0: off).", 0)
    eval_max_prompts_during_training: int = _help(
        "Held-out prompts used by the evaluations every eval_steps (0: as eval_max_prompts).", 16)
    num_threads: int | None = _help("CPU threads for torch (default: torch's choice).")
    ddp_timeout: int = _help(
        "Seconds a process waits in a collective before the run fails (torch.distributed's timeout; "
        "transformers' name and default). The other processes wait while the main process evaluates alone: "
        "`hypo plan` estimates how long that takes.", 1800)

    # --- data sources, held-out pairs, sharing (used by the paper's recipes in recipes/) -----------------
    dataset_config: str | None = _help(
        "Configuration (subset) of --dataset, for hub datasets and dataset folders that define several: "
        "datasets.load_dataset(dataset, dataset_config, split=dataset_split).")
    prompts_config: str | None = _help("Configuration (subset) of --prompts.")
    eval_prompts_split: str = _help("Split of --eval_prompts.", "train")
    eval_prompts_config: str | None = _help("Configuration (subset) of --eval_prompts.")
    eval_dataset: str | None = _help(
        "Held-out preference pairs (the formats of --dataset). At each evaluation (every eval_steps and at the end) "
        "their DPO loss and implicit rewards are logged under TRL's names: eval_loss, eval_rewards/chosen, "
        "eval_rewards/rejected, eval_rewards/accuracies, eval_rewards/margins, eval_logps/chosen, "
        "eval_logps/rejected.")
    eval_dataset_split: str = _help("Split of --eval_dataset.", "test")
    eval_dataset_config: str | None = _help("Configuration (subset) of --eval_dataset.")
    eval_max_pairs: int = _help("Held-out pairs of --eval_dataset used by each evaluation (0: all).", 0)
    per_device_eval_batch_size: int = _help("Held-out pairs per forward pass in the evaluation of --eval_dataset.",
                                            8)
    push_to_hub: bool = _help(
        "Upload the final model folder (weights, tokenizer and a model card, README.md) to the Hugging Face Hub "
        "at the end of training; needs a token (huggingface-cli login or HF_TOKEN).", False)
    hub_model_id: str | None = _help(
        "Repository of --push_to_hub, 'name' or 'org/name'; default: the name of output_dir's folder (as in TRL).")
    hub_private_repo: bool = _help("Create the --push_to_hub repository as private.", False)

    # --- KL budget (any method) ------------------------------------------------------------------------
    target_kl: float | None = _help(
        "A budget of reverse KL to the reference, in nats: the evaluation every eval_steps estimates KL(pi || pi_ref) "
        "on the held-out prompts (k1 on eval_max_prompts_during_training prompts x eval_num_samples samples, with its "
        "standard error); the first state whose estimate (plus target_kl_margin standard errors) exceeds the budget "
        "stops the run, and the final model is the last evaluated state within it (a checkpoint is saved at each such "
        "evaluation). Needs eval_steps and held-out prompts. Default: no budget.")
    target_kl_margin: float = _help(
        "Standard errors added to the KL estimate before comparing it with target_kl: a state is within the budget "
        "when kl + margin * se <= target_kl (0: the estimate itself; 2: within the budget at about 97.7 percent "
        "one-sided confidence, normal approximation, at the price of stopping earlier).", 0.0)

    def __post_init__(self) -> None:
        check_config(self, _problems)
        if self.dtype == "bfloat16" and not self.use_peft:  # LoRA: the frozen base only; adapters stay float32
            warnings.warn("dtype=bfloat16 keeps the weights themselves in bf16 (8 bits of mantissa): AdamW updates "
                          "smaller than about 1/256 of a weight are rounded away, so at learning rates near 1e-5 "
                          "most weights never change (measured: 84-90% of weight elements unchanged after 4-12 "
                          "steps). Use dtype=float32 with mixed_precision=bf16 for bf16 speed with every update "
                          "kept.", stacklevel=3)
        if self.method == "hypo" and self.num_generations == 1:
            warnings.warn("num_generations=1: the KL estimator has no baseline (higher variance)", stacklevel=3)

    @property
    def loss_types(self) -> list[str]:
        """`loss_type` as a list (one name or several)."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _field_types(config_class: type | None = None) -> dict[str, Any]:
    """Each field's annotation, resolved from its string form (``from __future__ import annotations``), of
    `config_class` (default: HyPOConfig; `hypo sft` has its own)."""
    return typing.get_type_hints(config_class or HyPOConfig)


def field_type_problems(config) -> list[str]:
    """The type problems of every field of a config dataclass instance (HyPOConfig, or `hypo sft`'s)."""
    cls = type(config)
    return [p for p in (_type_problem(f.name, getattr(config, f.name), cls) for f in dataclasses.fields(config)) if p]


def check_config(config, range_problems) -> None:
    """Validate a config dataclass instance: the type of every field first (the range checks assume the right
    types), then `range_problems(config)`; all problems in one ValueError. Numbers become plain Python numbers."""
    problems = field_type_problems(config) or list(range_problems(config))
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
    plain_numbers(config)


def same_as(name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field of another entry point's config (`hypo sft`) that means what HyPOConfig's field `name` means:
    the same help text, and its default unless `default` is given."""
    source = HyPOConfig.__dataclass_fields__[name]
    return field(default=source.default if default is dataclasses.MISSING else default, metadata=dict(source.metadata))


def plain_numbers(config) -> None:
    """Numeric fields as plain Python numbers: 1 -> 1.0 for a float field, numpy.int64(2) -> 2."""
    for name, annotation in _field_types(type(config)).items():
        value = getattr(config, name)
        kind = next((t for t in (int, float) if annotation in (t, t | None)), None)
        if kind is not None and value is not None and type(value) is not kind:
            setattr(config, name, kind(value))


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list (each {_describe(typing.get_args(annotation)[0])})"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null"}.get(annotation, str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is a valid value of the field type ``annotation`` (no conversion: 1.5 is no int,
    "0.1" no float, 1 no bool; an int is a float; floats must be finite)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in typing.get_args(annotation))
    if origin is list:
        return isinstance(value, list) and all(_matches(item, typing.get_args(annotation)[0]) for item in value)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:  # numbers.Integral: NumPy integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    raise TypeError(f"no validation rule for the field type {annotation!r}")


def _type_problem(name: str, value: Any, config_class: type | None = None) -> str | None:
    """The message for a ``value`` that does not fit the annotation of field ``name``, else None."""
    annotation = _field_types(config_class)[name]
    if _matches(value, annotation):
        return None
    origin = typing.get_origin(annotation)
    arms = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    expected = " or ".join(_describe(arm) for arm in arms)
    return f"{name} must be {expected}, got {value!r} ({type(value).__name__})"


def _problems(c: HyPOConfig):
    """Range and consistency checks of a HyPOConfig whose fields have the right types."""
    if c.beta <= 0:
        yield f"beta must be > 0, got {c.beta}"
    if c.kl_coef < 0:
        yield f"kl_coef must be >= 0, got {c.kl_coef}"
    yield from _loss_problems(c)
    for name in ("num_generations", "per_device_prompt_batch_size", "max_completion_length", "max_length",
                 "max_prompt_length", "eval_num_samples", "eval_batch_size"):
        if getattr(c, name) < 1:
            yield f"{name} must be >= 1, got {getattr(c, name)}"
    if c.dtype == "float16":
        yield ("dtype=float16 weights are refused: without loss scaling or float32 master weights, updates are "
               "rounded away and gradients overflow silently; use mixed_precision=fp16 (float32 weights, scaled loss)")
    if c.max_prompt_length >= c.max_length:
        yield f"max_prompt_length ({c.max_prompt_length}) must be < max_length ({c.max_length})"
    if c.eval_temperature <= 0 or not 0 < c.eval_top_p <= 1:
        yield f"eval_temperature must be > 0 and eval_top_p in (0, 1], got {c.eval_temperature} and {c.eval_top_p}"
    yield from _vllm_problems(c)
    yield from _memory_problems(c)
    yield from optimization_problems(c)
    yield from _generation_problems(c)
    if not 0 <= c.lora_dropout < 1:
        yield f"lora_dropout must be in [0, 1), got {c.lora_dropout}"
    if c.num_threads is not None and c.num_threads < 1:
        yield f"num_threads must be >= 1 when set, got {c.num_threads}"
    if c.eval_max_prompts < 0:
        yield f"eval_max_prompts must be >= 0 (0: all), got {c.eval_max_prompts}"
    if c.save_total_limit is not None and c.save_total_limit < 1:
        yield f"save_total_limit must be >= 1, got {c.save_total_limit}"
    if c.resume_from_checkpoint == "latest" and not c.output_dir:
        yield "resume_from_checkpoint latest needs output_dir (the run folder to continue)"
    if c.eval_steps < 0 or c.eval_max_prompts_during_training < 0:
        yield "eval_steps and eval_max_prompts_during_training must be >= 0"
    yield from _source_problems(c)
    yield from _kl_budget_problems(c)


def _kl_budget_problems(c: HyPOConfig):
    """target_kl needs an evaluation to measure the KL on (held-out prompts are checked with the data)."""
    if c.target_kl is None:
        return
    if c.target_kl <= 0:
        yield f"target_kl must be > 0 nats, got {c.target_kl}"
    if c.target_kl_margin < 0:
        yield f"target_kl_margin must be >= 0 standard errors, got {c.target_kl_margin}"
    if c.eval_steps == 0:
        yield "target_kl is checked at the evaluations every eval_steps optimizer steps: set eval_steps (e.g. 10)"


def _loss_problems(c: HyPOConfig):
    """Checks of the offline-loss section (TRL DPOTrainer's rules, and its value ranges)."""
    types = c.loss_types
    unknown = [name for name in types if name not in LOSS_TYPES]
    if not types or unknown:
        yield f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))} (or a list of them), got {c.loss_type!r}"
        return
    if c.loss_weights is not None and len(c.loss_weights) != len(types):
        yield f"loss_weights has {len(c.loss_weights)} weight(s) for {len(types)} loss type(s) ({', '.join(types)})"
    if not 0 <= c.label_smoothing < 0.5:
        yield f"label_smoothing must be in [0, 0.5), got {c.label_smoothing}"
    if c.label_smoothing and not LABEL_SMOOTHING_LOSSES & set(types):
        yield f"label_smoothing applies to {', '.join(sorted(LABEL_SMOOTHING_LOSSES))}; loss_type is {', '.join(types)}"
    if "exo_pair" in types and c.label_smoothing == 0:
        yield "loss_type exo_pair needs label_smoothing > 0 (its epsilon; the EXO paper suggests 1e-3)"
    if c.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
        yield (f"f_divergence_type {c.f_divergence_type} applies to {', '.join(sorted(F_DIVERGENCE_LOSSES))} only "
               f"(the others have no f-divergence form); loss_type is {', '.join(types)}")
    if c.discopop_tau <= 0:
        yield f"discopop_tau must be > 0, got {c.discopop_tau}"
    if c.ld_alpha is not None and not 0 <= c.ld_alpha <= 1:
        yield f"ld_alpha must be in [0, 1], got {c.ld_alpha}"
    if c.ld_alpha is not None and "sft" in types:
        yield ("ld_alpha with loss_type sft is not offered: sft's NLL counts every chosen token, and with ld_alpha the "
               "step scores the weighted log-probs only")


def optimization_problems(c):
    """Checks of the fields every training entry point shares (HyPOConfig, `hypo sft`'s config): batch and
    accumulation, steps or epochs, learning rate, warm-up, weight decay, clipping, LoRA shape, logging and
    saving intervals, the hub repository."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "lora_r",
                 "lora_alpha"):
        if getattr(c, name) < 1:
            yield f"{name} must be >= 1, got {getattr(c, name)}"
    if c.max_steps == 0 or c.max_steps < -1:
        yield f"max_steps must be >= 1, or -1 to use num_train_epochs, got {c.max_steps}"
    if c.max_steps == -1 and c.num_train_epochs <= 0:
        yield "num_train_epochs must be > 0 when max_steps is -1"
    if not 0 <= c.warmup_ratio < 1:
        yield f"warmup_ratio must be in [0, 1), got {c.warmup_ratio}"
    if c.learning_rate <= 0:
        yield f"learning_rate must be > 0, got {c.learning_rate}"
    if c.max_grad_norm < 0:
        yield f"max_grad_norm must be >= 0 (0 disables clipping), got {c.max_grad_norm}"
    if c.weight_decay < 0:
        yield f"weight_decay must be >= 0, got {c.weight_decay}"
    if c.save_steps < 0:
        yield f"save_steps must be >= 0 (0: only the final model), got {c.save_steps}"
    if c.dataset_config is not None and c.dataset is None:
        yield "dataset_config is the configuration of dataset, which is not set"
    if c.hub_model_id is not None and not HUB_REPO_ID.match(c.hub_model_id):
        yield f"hub_model_id must be 'name' or 'org/name' (letters, digits, '-', '_', '.'), got {c.hub_model_id!r}"


HUB_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
"""A Hugging Face Hub repository id: `name` or `org/name`."""


def _source_problems(c: HyPOConfig):
    """Checks of the data-source and held-out-pairs section."""
    for config_field, source_field in (("prompts_config", "prompts"), ("eval_prompts_config", "eval_prompts"),
                                       ("eval_dataset_config", "eval_dataset")):
        if getattr(c, config_field) is not None and getattr(c, source_field) is None:
            yield f"{config_field} is the configuration of {source_field}, which is not set"
    if c.eval_max_pairs < 0:
        yield f"eval_max_pairs must be >= 0 (0: all), got {c.eval_max_pairs}"
    if c.per_device_eval_batch_size < 1:
        yield f"per_device_eval_batch_size must be >= 1, got {c.per_device_eval_batch_size}"


def _generation_problems(c: HyPOConfig):
    steps, accumulation = c.steps_per_generation, c.gradient_accumulation_steps
    if steps is None or accumulation < 1:
        return
    if steps > accumulation:
        yield (f"steps_per_generation ({steps}) > gradient_accumulation_steps ({accumulation}) would reuse samples "
               "across optimizer steps, where they no longer come from the current policy; not supported")
    elif steps < 1 or accumulation % steps:
        yield f"steps_per_generation must divide gradient_accumulation_steps ({accumulation}), got {steps}"


def _vllm_problems(c: HyPOConfig):
    if c.vllm_server_timeout <= 0:
        yield f"vllm_server_timeout must be > 0 seconds, got {c.vllm_server_timeout}"
    if not 0 < c.vllm_gpu_memory_utilization <= 1:
        yield f"vllm_gpu_memory_utilization must be in (0, 1], got {c.vllm_gpu_memory_utilization}"
    if c.vllm_server_base_url is not None and not re.match(r"^https?://[^/\s]+", c.vllm_server_base_url):
        yield f"vllm_server_base_url must be an http:// or https:// URL, got {c.vllm_server_base_url!r}"
    if not c.use_vllm:
        return
    if c.method != "hypo":
        yield "use_vllm samples the online KL term's completions; method dpo samples nothing (drop use_vllm)"
    if c.vllm_mode == "colocate" and (c.vllm_server_base_url or c.vllm_server_weights_dir):
        yield "vllm_server_base_url and vllm_server_weights_dir are for vllm_mode server, not colocate"


def _memory_problems(c: HyPOConfig):
    """Checks of the options that trade memory for speed."""
    if c.ddp_timeout < 1:
        yield f"ddp_timeout must be >= 1 second, got {c.ddp_timeout}"
    if c.attn_implementation is not None and not c.attn_implementation.strip():
        yield "attn_implementation must be a kernel name (sdpa, eager, flash_attention_2, ...) or unset"
    if c.fused_lm_head and c.share_prompt_forward:
        yield "fused_lm_head scores whole rows in one forward; share_prompt_forward scores completions against " \
              "cached prompts: choose one"
    if c.vllm_enable_sleep_mode and not (c.use_vllm and c.vllm_mode == "colocate"):
        yield "vllm_enable_sleep_mode puts a colocated engine to sleep: it needs use_vllm and vllm_mode colocate"


@functools.cache
def _yaml_loader():
    """PyYAML's safe loader plus YAML 1.2's floats without a dot (``1e-5``, ``5e3``), which YAML 1.1 reads
    as strings: ``learning_rate: 1e-5`` must be a number."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(number), list("-+0123456789."))
    return Loader


def _parse_config_text(path: Path, text: str) -> Any:
    """The file's data; a syntax error is a ValueError naming the file and, when known, the line."""
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and (mark is None or start.line != mark.line):
            problem += f" ({context} started on line {start.line + 1})"
        raise ValueError(f"{path}: {where}invalid YAML: {problem}") from None


RENAMED_OPTIONS = {
    "temperature": "eval_temperature (it tempers the judged evaluation samples only; the KL samples are always "
                   "drawn at temperature 1)",
    "top_p": "eval_top_p (judged evaluation samples only)",
}
"""Options of earlier versions (a config file, or the config.json of a run to resume) and their names now."""


def read_config_file(path: str | Path, config_class: type | None = None, translate=None) -> dict[str, Any]:
    """Read a YAML or JSON mapping of the fields of `config_class` (default: HyPOConfig); `translate` (a function of
    the mapping) renames other spellings of options first (the command line's TRL names).

    Every problem is a ValueError naming the file: a syntax error (with its line), unknown keys, and a
    value whose type does not fit the option (``max_steps: 1.5``, ``kl_coef: .inf``, ``use_peft: "yes"``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    data = _parse_config_text(path, text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    if translate is not None:
        try:
            data = translate(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    known = {f.name for f in dataclasses.fields(config_class or HyPOConfig)}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        hints = [f"{key} is now {RENAMED_OPTIONS[key]}" for key in unknown if key in RENAMED_OPTIONS]
        raise ValueError(f"{path}: unknown option(s): {', '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))
    problems = [f"option '{key}': {problem}" for key, value in data.items()
                if (problem := _type_problem(key, value, config_class))]
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return data


def save_config(config: HyPOConfig, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return path
