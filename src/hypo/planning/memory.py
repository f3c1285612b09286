"""The peak memory of a training run on one GPU, by part and by phase, from its config, its model's shapes and how
it is launched.

A run's memory on one GPU is what stays for the whole run (the policy's weights, the reference, the gradients,
AdamW's moments, a colocated vLLM engine) plus what one phase adds: the offline step (activations kept for the
backward, autocast's weight copies, the logits), HyPO's sampling (the key/value cache, the weights gathered for
`generate` under sharding), HyPO's scoring step, and the main process's held-out evaluation (whose gradients are
freed, except DDP's all-reduce buckets). The peak is the largest phase. Every number is arithmetic (bytes, GB = 1e9 bytes); the activation formulas
are checked against the bytes a CPU forward saves (`hypo.planning.activations`), the parameter, gradient and
optimizer bytes against a CPU step's (`tests/test_planning.py`). Worst case lengths: every row as long as the
config allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hypo.config import HyPOConfig
from hypo.planning.activations import (
    FLOAT32,
    Precision,
    autocast_weight_copies,
    checkpointed_layer_bytes,
    layer_activation_bytes,
)
from hypo.planning.shapes import ModelShape

Sharding = Literal["none", "ddp", "fsdp2", "zero3"]
PARTS = ("weights", "reference", "gradients", "optimizer", "engine", "gathered weights", "activations",
         "autocast weight copies", "logits", "sampler (KV cache)")
"""The rows of a plan: the first five stay for the whole run (the engine while awake), the rest belong to a phase."""

TRAINING_LOGIT_BYTES = 10
"""Bytes per element of the (rows, positions, vocabulary) logits in a forward and backward of the plain path: the
float32 logits kept for the backward (accelerate upcasts the model's bf16 output), their gradient, and the
transients of the row-wise log-softmax (measured on a CPU: 9.8 bytes per logit with bf16 autocast, 9.8 without)."""
SCORING_LOGIT_BYTES = 6
"""Bytes per logit of a forward without gradients under autocast: the bf16 output and its float32 copy."""
FUSED_TOKEN_TILE, FUSED_VOCAB_TILE = 4096, 32768
"""TRL's fused output layer (`trl.kernels.chunked_logprob`) projects 4,096 positions x 32,768 words at a time."""


@dataclass(frozen=True)
class Launch:
    """How a run is launched: GPUs (one process each), their memory, and how the model is spread over them."""

    num_gpus: int = 1
    gpu_memory_gb: float = 80.0
    sharding: Sharding = "none"  # none: one process; ddp: a whole copy per GPU; fsdp2 / zero3: weights sharded
    source: str = "flags"  # the accelerate config it came from, or flags

    @property
    def shards(self) -> int:
        """Over how many GPUs the weights, gradients and optimizer are split."""
        return self.num_gpus if self.sharding in ("fsdp2", "zero3") else 1


@dataclass
class Plan:
    """Bytes per GPU: `phases[phase][part]`. `persistent` parts are in every phase they belong to."""

    config: HyPOConfig
    shape: ModelShape
    launch: Launch
    phases: dict[str, dict[str, float]]
    notes: list[str] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)  # host memory and shared-memory needs, bytes
    headroom_gb: float | None = None  # left free for the CUDA context, NCCL and fragmentation (default 10%)

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    @property
    def usable(self) -> float:
        """Bytes a run may plan for: the GPU's memory less the headroom."""
        headroom = self.headroom_gb if self.headroom_gb is not None else 0.1 * self.launch.gpu_memory_gb
        return (self.launch.gpu_memory_gb - headroom) * 1e9

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


def compute_bytes(config: HyPOConfig) -> int:
    """Bytes of the compute dtype on a GPU: 2 with mixed precision (`auto` is bf16 on GPUs that support it)."""
    return 4 if config.mixed_precision == "no" else 2


def weight_bytes(config: HyPOConfig, shape: ModelShape) -> int:
    """Bytes per weight as loaded (`dtype`; `auto` takes the checkpoint's)."""
    if config.dtype == "auto":
        return 4 if shape.checkpoint_dtype in (None, "float32") else 2
    return {"float32": 4, "bfloat16": 2, "float16": 2}[config.dtype]


def training_precision(config: HyPOConfig, shape: ModelShape, launch: Launch) -> Precision:
    """How the policy's training forward computes. FSDP2 and ZeRO-3 run it on weights gathered in the compute
    dtype (FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16), so the residual stream and the weights have it."""
    c = compute_bytes(config)
    weights = c if launch.sharding in ("fsdp2", "zero3") else weight_bytes(config, shape)
    lora_rank = config.lora_r if config.use_peft else 0
    return Precision(weight_bytes=weights, autocast=c == 2, trained_base=not config.use_peft, lora_rank=lora_rank)


def completion_positions(config: HyPOConfig) -> int:
    """The longest offline completion: `max_completion_length`, and at most `max_length` - 1 after a prompt."""
    return min(config.max_completion_length, config.max_length - 1)


def shares_prompt(config: HyPOConfig) -> bool:
    """Whether each prompt runs once for its completions: GPUs default to no (`share_prompt_forward`)."""
    return bool(config.share_prompt_forward) and not config.gradient_checkpointing


def forward_tokens(config: HyPOConfig, prompts: int, rows: int, completion: int) -> int:
    """Tokens of one scoring forward: `rows` completions of `completion` tokens after `prompts` prompts (each
    prompt once when shared, else once per row), every prompt `max_prompt_length` long.

    Example: 4 pairs of a 512-token prompt and 512-token completions, not shared: 8 x 1024 = 8,192 tokens.
    """
    prompt_rows = prompts if shares_prompt(config) else rows
    return prompt_rows * config.max_prompt_length + rows * completion


def activation_bytes(config: HyPOConfig, shape: ModelShape, p: Precision, tokens: int, rows: int) -> int:
    """What a training forward of `tokens` tokens (in `rows` rows) keeps for its backward: every layer's saved
    tensors and the final norm's, or under gradient checkpointing every layer's input plus one layer recomputed.

    Example (Llama-3-8B, LoRA, bf16 weights, checkpointing, 8,192 tokens): 32 x 8,192 x 8,192 (inputs) +
    8,192 x 217,448 (one layer recomputed) = 2.15 + 1.78 GB.
    """
    per_row = tokens // max(rows, 1)
    layer = layer_activation_bytes(shape, p, config.attn_implementation or "sdpa", per_row)
    final_norm = FLOAT32 * shape.hidden_size + FLOAT32 + (p.weight_bytes * shape.hidden_size if p.trained_base else 0)
    if config.gradient_checkpointing:
        return tokens * (shape.num_layers * checkpointed_layer_bytes(shape, p) + layer + final_norm)
    return tokens * (shape.num_layers * layer + final_norm)


def logits_bytes(config: HyPOConfig, shape: ModelShape, positions: int, *, training: bool) -> int:
    """The output layer's memory for `positions` scored positions (rows x completion + 1): the full logits
    (`TRAINING_LOGIT_BYTES` or `SCORING_LOGIT_BYTES` per logit), or with `fused_lm_head` TRL's CUDA kernel: one
    tile of logits and of the output layer's weight in the compute dtype, the float32 gradient of the hidden
    states and, for a trained output layer, of its weight. (Off CUDA, TRL folds the tiles in torch, scoring every
    position with several tile-sized temporaries: 508 MB measured for a 504 x 30,000 tile in float32.)

    Example (Llama-3-8B, 8 rows x 513 positions, training, plain): 8 x 513 x 128,256 x 10 = 5.26 GB; fused,
    LoRA: 4096 x 32768 x 2 + 32768 x 4096 x 2 + 4104 x 4096 x 4 = 0.60 GB.
    """
    vocab, hidden = shape.vocab_size, shape.hidden_size
    if not config.fused_lm_head:
        return positions * vocab * (TRAINING_LOGIT_BYTES if training else SCORING_LOGIT_BYTES)
    c = compute_bytes(config)
    tile = (min(positions, FUSED_TOKEN_TILE) + hidden) * min(vocab, FUSED_VOCAB_TILE) * c
    if not training:
        return tile
    head_gradient = FLOAT32 * vocab * hidden if not config.use_peft else 0
    return tile + FLOAT32 * positions * hidden + head_gradient


def kv_cache_bytes(config: HyPOConfig, shape: ModelShape, rows: int) -> int:
    """Keys and values of `rows` sequences of `max_prompt_length + max_completion_length` tokens (a static cache
    allocates that much at once, a dynamic one grows to it).

    Example (Llama-3-8B, 2 rows of 1,024 tokens, bf16): 2 x 1024 x 32 layers x 2 x 8 x 128 x 2 = 0.27 GB.
    """
    kv_heads = shape.num_kv_heads if shape.family != "gpt_neox" else shape.num_heads
    length = config.max_prompt_length + config.max_completion_length
    return rows * length * shape.num_layers * 2 * kv_heads * shape.head_dim * compute_bytes(config)


def decoding_weight_copies(config: HyPOConfig, shape: ModelShape, launch: Launch) -> int:
    """Autocast's copies of float32 weights while one decoding step runs: a trained weight's copy is cached until
    the forward ends (every layer's), a frozen one is made and freed op by op (the largest: the output layer).
    None when the weights already have the compute dtype or are gathered in it (FSDP2, ZeRO-3)."""
    c = compute_bytes(config)
    if launch.sharding in ("fsdp2", "zero3") or c == 4 or weight_bytes(config, shape) == c:
        return 0
    if config.use_peft:
        return c * shape.embedding_params
    return c * (shape.num_layers * shape.layer_linear_weights + shape.embedding_params)


def engine_bytes(config: HyPOConfig, launch: Launch, *, awake: bool) -> float:
    """A colocated vLLM engine's share of the GPU (`vllm_gpu_memory_utilization`); with sleep mode it gives its
    weights and cache back between samplings (what stays asleep is not counted: not measured)."""
    if not (config.method == "hypo" and config.use_vllm and config.vllm_mode == "colocate"):
        return 0.0
    if config.vllm_enable_sleep_mode and not awake:
        return 0.0
    return config.vllm_gpu_memory_utilization * launch.gpu_memory_gb * 1e9


def memory_plan(config: HyPOConfig, shape: ModelShape, launch: Launch, *, headroom_gb: float | None = None) -> Plan:
    """The peak memory per GPU of a run of `config` on `shape` launched as `launch`, by part and phase."""
    notes: list[str] = []
    shards = launch.shards
    c, w = compute_bytes(config), weight_bytes(config, shape)
    p = training_precision(config, shape, launch)
    lora = shape.lora_params(config.lora_r, config.lora_target_modules) if config.use_peft else 0
    trained = lora if config.use_peft else shape.params
    zero3_bf16 = launch.sharding == "zero3" and c == 2

    persistent = {
        # ZeRO-3 under bf16 keeps bf16 partitions of the weights and float32 masters in its optimizer
        "weights": (shape.params * (2 if zero3_bf16 else w) + FLOAT32 * lora) / shards,
        "reference": 0.0 if config.use_peft else shape.params * (2 if zero3_bf16 else w) / shards,
        # DDP: the gradients are views of its all-reduce buckets (`gradient_as_bucket_view`), one copy
        "gradients": FLOAT32 * trained / shards,
        "optimizer": (2 + (1 if zero3_bf16 else 0)) * FLOAT32 * trained / shards,
    }
    gathered = 0
    if shards > 1:  # the layer running and the next one prefetched, and the embeddings and output layer
        gathered = c * (2 * shape.layer_params + shape.embedding_params + shape.head_params)

    def training_phase(prompts: int, rows: int, completion: int) -> dict[str, float]:
        tokens = forward_tokens(config, prompts, rows, completion)
        copies = autocast_weight_copies(shape, p, checkpointing=config.gradient_checkpointing)
        if config.use_peft and p.autocast:
            copies += 2 * lora  # the float32 adapters' bf16 copies
        return {**persistent, "engine": engine_bytes(config, launch, awake=False), "gathered weights": gathered,
                "activations": activation_bytes(config, shape, p, tokens, rows), "autocast weight copies": copies,
                "logits": logits_bytes(config, shape, rows * (completion + 1), training=True)}

    pairs = config.per_device_train_batch_size
    phases = {"offline step": training_phase(pairs, 2 * pairs, completion_positions(config))}
    if config.method == "hypo":
        samples = config.per_device_prompt_batch_size * config.num_generations
        sampler = {**persistent, "engine": engine_bytes(config, launch, awake=True)}
        if not config.use_vllm:
            sampler["gathered weights"] = c * shape.params if shards > 1 else 0
            sampler["autocast weight copies"] = decoding_weight_copies(config, shape, launch)
            sampler["sampler (KV cache)"] = kv_cache_bytes(config, shape, samples)
        phases["sampling"] = sampler
        phases["online step"] = training_phase(config.per_device_prompt_batch_size, samples,
                                               config.max_completion_length)
    if config.eval_at_end or config.eval_steps:
        rows = config.eval_batch_size * config.eval_num_samples
        evaluation = dict(persistent)
        if not (launch.sharding == "ddp" and launch.num_gpus > 1):  # DDP's buckets stay; elsewhere zero_grad frees
            evaluation["gradients"] = 0.0
        evaluation["engine"] = engine_bytes(config, launch, awake=False)
        if shards > 1:  # the main process holds the whole policy and reference
            evaluation["gathered weights"] = c * shape.params * (1 if config.use_peft else 2)
        evaluation["autocast weight copies"] = decoding_weight_copies(config, shape, launch)
        evaluation["sampler (KV cache)"] = kv_cache_bytes(config, shape, rows)
        evaluation["logits"] = max(logits_bytes(config, shape, rows * (config.max_completion_length + 1), training=False),
                                   logits_bytes(config, shape, 2 * config.per_device_eval_batch_size
                                                * (completion_positions(config) + 1), training=False))
        phases["evaluation (main process)"] = evaluation
    phases = {name: {part: float(parts.get(part, 0.0)) for part in PARTS} for name, parts in phases.items()}
    plan = Plan(config, shape, launch, phases, notes, headroom_gb=headroom_gb)
    plan.host = host_needs(config, shape, launch)
    plan.notes.extend(plan_notes(config, shape, launch))
    return plan


def host_needs(config: HyPOConfig, shape: ModelShape, launch: Launch) -> dict[str, float]:
    """Host memory and shared memory a run needs beyond loading: the weights file of each vLLM server push (in the
    server's dtype, bf16 assumed), the full weights gathered to the main process under sharding, and the merged
    float32 copy of a LoRA model that each save writes."""
    needs = {}
    if config.method == "hypo" and config.use_vllm and config.vllm_mode == "server":
        needs["vLLM push file (in vllm_server_weights_dir, default /dev/shm)"] = 2.0 * shape.params
    if launch.shards > 1:
        needs["full weights gathered on the main process (saves, pushes)"] = FLOAT32 * shape.params
    if config.use_peft:
        needs["merged float32 model built on the CPU at each save"] = FLOAT32 * shape.params
    return needs


def plan_notes(config: HyPOConfig, shape: ModelShape, launch: Launch) -> list[str]:
    """What the arithmetic assumes, and what it does not count."""
    notes = []
    if shape.family != "gpt_neox" and shape.model_type not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2"):
        notes.append(f"{shape.model_type}: activations counted with the Llama layer's formula")
    if config.use_peft and config.lora_target_modules != "all-linear":
        notes.append("LoRA on some layers: activations counted as for all linear layers (an upper bound)")
    if config.use_peft and launch.shards > 1:
        notes.append("LoRA under sharding: the adapters are sharded with the base (not measured)")
    if config.fused_lm_head:
        notes.append("fused_lm_head: TRL's tiles counted for every position of each forward (its CUDA kernel "
                     "scores only the completion positions)")
    if launch.sharding == "zero3":
        notes.append("ZeRO-3: weights, gradients and optimizer partitioned as under FSDP2 (bf16 partitions and "
                     "float32 masters); DeepSpeed's buckets are not counted")
    return notes


def evaluation_decoding_steps(config: HyPOConfig) -> int:
    """Decoding steps of the end-of-run evaluation on the main process: per batch of held-out prompts, the
    policy's samples (twice when the judged ones use another temperature or top-p) and the reference's.

    Example: 128 prompts in batches of 8, 512 tokens, temperature 1: 16 x (1 + 1) x 512 = 16,384.
    """
    batches = -(-config.eval_max_prompts // config.eval_batch_size) if config.eval_max_prompts else 0
    policy = 2 if (config.eval_temperature != 1.0 or config.eval_top_p != 1.0) else 1
    return batches * (policy + 1) * config.max_completion_length
