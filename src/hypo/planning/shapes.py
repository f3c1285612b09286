"""The shapes a memory plan needs, read from a model's config: sizes, parameter counts, LoRA's trainable count.

Read offline: a local folder's config.json, a model in the Hugging Face cache, or a small table of the models the
recipes and the bench use (`KNOWN_MODELS`). Parameters are counted exactly on a model built on the meta device
(no memory, no weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypo.config import DEFAULT_MODEL

_LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
_LLAMA32_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                   max_position_embeddings=131072, tie_word_embeddings=True, torch_dtype="bfloat16")
_TINYLLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
_SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, torch_dtype="bfloat16")
_PYTHIA_1_4B = dict(model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=24, num_attention_heads=16, rotary_pct=0.25, use_parallel_residual=True,
                    max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="float16")
_PYTHIA_2_8B = dict(_PYTHIA_1_4B, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                    num_attention_heads=32)

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B,
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA32_1B,
    "meta-llama/Llama-3.2-1B": _LLAMA32_1B,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _TINYLLAMA,
    "EleutherAI/pythia-1.4b-deduped": _PYTHIA_1_4B,
    "EleutherAI/pythia-1.4b": _PYTHIA_1_4B,
    "EleutherAI/pythia-2.8b-deduped": _PYTHIA_2_8B,
    "EleutherAI/pythia-2.8b": _PYTHIA_2_8B,
    "cleanrl/EleutherAI_pythia-2.8b-deduped__sft__tldr": _PYTHIA_2_8B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    DEFAULT_MODEL: _SMOLLM2_135M,
}
"""Configs (the fields a plan reads) of common hub models, so that `hypo plan` works offline."""

LAYER_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
                  "olmo2": "llama", "gpt_neox": "gpt_neox"}
"""The decoder-layer layout whose activation arithmetic applies (`hypo.planning.memory`): llama (RMSNorm, gated MLP,
grouped keys and values) or gpt_neox (LayerNorm, plain MLP, parallel attention and MLP)."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic reads of a causal LM."""

    name: str
    family: str  # "llama" or "gpt_neox" (see LAYER_FAMILIES); others are planned as "llama", with a note
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    params: int  # every parameter, tied ones once
    layer_params: int  # one decoder layer
    layer_linear_weights: int  # the weight matrices of one decoder layer's linear layers (no biases, no norms)
    embedding_params: int  # the input embeddings
    head_params: int  # the output layer; 0 when tied to the input embeddings
    linear_shapes: tuple[tuple[str, int, int], ...]  # (module name, in, out) of each linear layer but the output layer
    checkpoint_dtype: str | None = None  # the dtype the weights are stored in (config's torch_dtype)

    @property
    def tied(self) -> bool:
        return self.head_params == 0

    def lora_params(self, r: int, target_modules: str) -> int:
        """Trainable parameters of LoRA adapters of rank `r` on `target_modules` (peft's matching: `all-linear`,
        or comma-separated names, each matching a module name or its last parts): r * (in + out) per layer.

        Example: one 4096 x 4096 projection with r 16 -> 16 * (4096 + 4096) = 131,072.
        """
        targets = None if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
        total = 0
        for name, fan_in, fan_out in self.linear_shapes:
            if targets is None or any(name == t or name.endswith("." + t) for t in targets):
                total += r * (fan_in + fan_out)
        return total


def model_config(name_or_path: str, gguf_file: str | None = None):
    """The transformers config of a model, offline: a local folder (or GGUF, converted once), the Hugging Face
    cache, or `KNOWN_MODELS`; a ValueError naming the model otherwise."""
    from transformers import AutoConfig

    if name_or_path in KNOWN_MODELS:
        fields = dict(KNOWN_MODELS[name_or_path])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(name_or_path)
    if gguf_file or str(name_or_path).endswith(".gguf"):
        from hypo.models.loading import resolve_model_path

        path = Path(resolve_model_path(name_or_path, gguf_file))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: no config.json (a model folder written by save_pretrained has one)")
        return AutoConfig.from_pretrained(str(path))
    if path.is_absolute() or str(name_or_path).startswith((".", "runs/")) or str(name_or_path).count("/") > 1:
        raise ValueError(f"model folder {name_or_path} not found (a recipe's SFT output before the SFT step?): plan "
                         "with the shapes of the model it will be, e.g. --shape_from EleutherAI/pythia-2.8b-deduped")
    try:
        return AutoConfig.from_pretrained(str(name_or_path), local_files_only=True)
    except (OSError, ValueError):
        known = ", ".join(sorted(k for k in KNOWN_MODELS if "/" in k))
        raise ValueError(f"no config of {name_or_path} offline (not a local folder, not in the Hugging Face cache, "
                         f"not one of the built-in models: {known}); pass --shape_from a folder holding its "
                         "config.json") from None


def model_shape(name_or_path: str, gguf_file: str | None = None) -> ModelShape:
    """The `ModelShape` of a model (see `model_config`), its parameters counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(name_or_path, gguf_file)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied parameters once
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_params = 0 if head is None or head.weight is embeddings.weight else sum(p.numel() for p in head.parameters())
    layers = _decoder_layers(model)
    linear_shapes = tuple((name, module.in_features, module.out_features) for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and module is not head)
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    model_type = config.model_type
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return ModelShape(
        name=name_or_path, family=LAYER_FAMILIES.get(model_type, "llama"), model_type=model_type,
        vocab_size=config.vocab_size, hidden_size=hidden, intermediate_size=config.intermediate_size,
        num_layers=len(layers), num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim, params=params, layer_params=sum(p.numel() for p in layers[0].parameters()),
        layer_linear_weights=sum(m.weight.numel() for m in layers[0].modules() if isinstance(m, torch.nn.Linear)),
        embedding_params=embeddings.weight.numel(), head_params=head_params, linear_shapes=linear_shapes,
        checkpoint_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None)


def _decoder_layers(model) -> list:
    """The repeated decoder layers (the longest ModuleList of the model)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    return list(max(lists, key=len))
