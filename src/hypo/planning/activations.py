"""Bytes a forward pass keeps for its backward, per token and decoder layer, from the layer's layout.

Each term is a tensor autograd saves, counted from the operations of transformers' Llama and GPT-NeoX layers
(the lists were read with `torch.autograd.graph.saved_tensors_hooks`, and `tests/test_planning.py` checks every
formula against the bytes a CPU forward really saves, for float32 and bfloat16 weights, with and without bf16
autocast, full and LoRA). Notation: H hidden size, I intermediate size, nh query heads, nkv key/value heads, hd
head dimension; r the bytes of a weight (and so of the residual stream: 4 for float32 weights, 2 for bfloat16),
c the bytes of the compute dtype (2 under bf16/fp16 autocast, else r).

What autocast does to memory, and why the weights' dtype matters:
- a float32 activation feeding a linear layer is cast to bf16 once per layer that reads it (q, k and v each make
  their own copy), and each copy is kept when that layer's weight is trained;
- a float32 weight is cast to bf16 for its matmul, and the copy is kept for the backward (trained weights and
  frozen ones alike: the gradient of the input needs it): the whole model's linear weights in bf16 between the
  forward and the backward, unless gradient checkpointing recomputes them layer by layer
  (`autocast_weight_copies`);
- LoRA (peft) casts each adapted layer's input to the adapter's float32 and autocast casts it back: one bf16 copy
  per adapted layer, whatever the base weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypo.planning.shapes import ModelShape

FLOAT32 = 4


@dataclass(frozen=True)
class Precision:
    """How a forward computes: the weights' bytes, whether autocast is on, and which weights are trained."""

    weight_bytes: int  # 4 float32, 2 bfloat16: also the residual stream's dtype
    autocast: bool  # bf16 / fp16 autocast (mixed_precision); compute in 2 bytes
    trained_base: bool  # full fine-tuning (the base weights and norms take gradients); False with LoRA
    lora_rank: int = 0  # LoRA adapters (float32) on every linear layer of the decoder

    @property
    def compute_bytes(self) -> int:
        return 2 if self.autocast else self.weight_bytes


def attention_bytes(shape: ModelShape, p: Precision, attention: str, tokens_per_row: int) -> int:
    """Saved bytes per token of the attention itself, from its q, k, v to its output (the output projection's
    input is counted by the layer).

    sdpa / flash: q, k, v and the output in the compute dtype, and a float32 log-sum-exp per head. Eager: q, and k
    and v repeated to every query head, and the (nh, T, T) probabilities, in float32 (softmax) and in the compute
    dtype for their matmul with v (once when that is float32); its output is a new tensor, counted by the layer.

    Example (Llama-3-8B: nh 32, nkv 8, hd 128, bf16 autocast, sdpa): 2 * (2 * 4096 + 2 * 1024) + 4 * 32 = 20,608.
    """
    c, q_dim, kv_dim = p.compute_bytes, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    if shape.family == "gpt_neox":
        kv_dim = q_dim  # no grouped keys and values
    if attention == "eager":
        probabilities = (FLOAT32 + (c if c != FLOAT32 else 0)) * shape.num_heads * tokens_per_row
        return 3 * c * q_dim + probabilities
    return c * (2 * q_dim + 2 * kv_dim) + FLOAT32 * shape.num_heads


def _norm_output_inputs(p: Precision, consumers: int, hidden: int) -> int:
    """Saved copies of a norm's output read by `consumers` linear layers (q, k, v, or gate, up).

    Trained weights keep their input: one cast per reader under autocast on float32 activations, else the output
    itself once. LoRA keeps the adapters' input: one bf16 copy per reader under autocast, else the float32
    output once (float32 weights) or a float32 copy per reader (bfloat16 weights).
    """
    r, c = p.weight_bytes, p.compute_bytes
    if p.trained_base:
        return consumers * c * hidden if p.autocast and r != c else r * hidden
    if p.autocast:
        return consumers * c * hidden
    return FLOAT32 * hidden * (1 if r == FLOAT32 else consumers)


def _inner_input(p: Precision, size: int) -> int:
    """Saved bytes of the input of a linear layer that reads a tensor made inside the layer (the attention
    output, the MLP's hidden activation), `size` values per token: that tensor in the compute dtype, or with LoRA
    without autocast on bfloat16 weights, the adapter's float32 copy of it."""
    if not p.trained_base and not p.autocast and p.weight_bytes != FLOAT32:
        return FLOAT32 * size
    return p.compute_bytes * size


def llama_layer_bytes(shape: ModelShape, p: Precision, attention: str = "sdpa", tokens_per_row: int = 0) -> int:
    """Saved bytes per token of one Llama decoder layer (RMSNorm, attention, gated MLP) in training.

    RMSNorm keeps its input in float32 and the inverse RMS (4H + 4), plus the normalized input when its weight is
    trained (rH); the MLP keeps gate, SiLU(gate) and up (3cI) and the down projection's input (cI). With sdpa the
    output projection of a trained model reads the attention's own output (nothing more); LoRA's adapter copies it.

    Example (Llama-3-8B with LoRA r 16 on every linear layer, bf16 autocast, any weight dtype, sdpa): norms
    2 * (4 * 4096 + 4) = 32,776; q, k, v, gate, up inputs 5 * 2 * 4096 = 40,960; o input 2 * 4096 = 8,192;
    attention 20,608; MLP 4 * 2 * 14,336 = 114,688; LoRA B inputs 7 * 2 * 16 = 224: 217,448 bytes (218 KB).
    """
    H, I, r = shape.hidden_size, shape.intermediate_size, p.weight_bytes  # noqa: E741 (the docs' I)
    q_dim = shape.num_heads * shape.head_dim
    norms = 2 * (FLOAT32 * H + FLOAT32 + (r * H if p.trained_base else 0))
    inputs = _norm_output_inputs(p, 3, H) + _norm_output_inputs(p, 2, H)
    if p.trained_base or (not p.autocast and r == FLOAT32):  # reads the attention output itself: sdpa keeps it
        o_input = p.compute_bytes * q_dim if attention == "eager" else 0  # eager's output is a new tensor
    else:  # LoRA's adapter copies it
        o_input = _inner_input(p, q_dim)
    mlp = 3 * p.compute_bytes * I + _inner_input(p, I)
    lora_b = 7 * (2 if p.autocast else FLOAT32) * p.lora_rank if not p.trained_base else 0
    return norms + inputs + o_input + attention_bytes(shape, p, attention, tokens_per_row) + mlp + lora_b


def gpt_neox_layer_bytes(shape: ModelShape, p: Precision, attention: str = "sdpa", tokens_per_row: int = 0) -> int:
    """Saved bytes per token of one GPT-NeoX (Pythia) decoder layer: attention and MLP in parallel on the same
    input, LayerNorms, fused q/k/v projection, GELU MLP.

    Both LayerNorms read the layer input (kept once, rH) and keep a mean and an inverse deviation each (in the
    input's dtype on CPUs); the dense projection reads a copy of the attention output; the MLP keeps the GELU's
    input and output (2cI). Under CUDA autocast LayerNorm runs in float32, so with bfloat16 weights each keeps a
    float32 copy of the input instead (up to 8H more per token than counted here; the recipes' weights are
    float32, where CPU and CUDA agree).

    Example (Pythia-2.8B: H 2560, I 10240, 32 heads of 80, float32 weights, bf16 autocast, full fine-tuning):
    norms 4 * 2560 + 16; q/k/v and MLP input casts 2 * 2 * 2560; attention 2 * 4 * 2560 + 4 * 32; dense input
    2 * 2560; MLP 2 * 2 * 10240: 87,184 bytes.
    """
    H, I, r = shape.hidden_size, shape.intermediate_size, p.weight_bytes  # noqa: E741 (the docs' I)
    q_dim = shape.num_heads * shape.head_dim
    norms = r * H + 2 * 2 * r
    inputs = _norm_output_inputs(p, 1, H) * 2  # the fused q/k/v projection; the MLP's first layer
    mlp = p.compute_bytes * I + _inner_input(p, I)
    lora_b = 4 * (2 if p.autocast else FLOAT32) * p.lora_rank if not p.trained_base else 0
    return norms + inputs + attention_bytes(shape, p, attention, tokens_per_row) + _inner_input(p, q_dim) + mlp + lora_b


def layer_activation_bytes(shape: ModelShape, p: Precision, attention: str = "sdpa", tokens_per_row: int = 0) -> int:
    """Saved bytes per token of one decoder layer of `shape`'s family (other families: the Llama layout)."""
    if shape.family == "gpt_neox":
        return gpt_neox_layer_bytes(shape, p, attention, tokens_per_row)
    return llama_layer_bytes(shape, p, attention, tokens_per_row)


def checkpointed_layer_bytes(shape: ModelShape, p: Precision) -> int:
    """Saved bytes per token of one layer under gradient checkpointing: its input, in the residual's dtype.

    Example (Llama-3-8B, bfloat16 weights): 2 * 4096 = 8,192.
    """
    return p.weight_bytes * shape.hidden_size


def autocast_weight_copies(shape: ModelShape, p: Precision, *, checkpointing: bool) -> int:
    """Bytes of the compute-dtype copies of float32 linear weights that autocast makes in a forward with
    gradients and keeps for the backward: every decoder layer's (one layer at a time under gradient
    checkpointing) and the output layer's. None when the weights already have the compute dtype.

    Example (Llama-3-8B, float32 weights, bf16, no checkpointing): 2 * (32 * 218.1M + 525.3M) = 15.0 GB.
    """
    if not p.autocast or p.weight_bytes == p.compute_bytes:
        return 0
    layers = 1 if checkpointing else shape.num_layers
    return p.compute_bytes * (layers * shape.layer_linear_weights + shape.embedding_params)
