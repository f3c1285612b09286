"""Load the policy, the reference and the tokenizer: hub id, local folder, GGUF file, or the embedded default.

A GGUF model (the embedded SmolLM2-135M-Instruct included) is converted once to a safetensors folder
(`hypo.models.gguf`) and loaded from there. Dropout is switched off at load time (docs/design.md: the
objective); LoRA adapters come from peft, and the reference of a LoRA run is the base model with its
adapters disabled (`hypo.models.reference`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hypo.config import DEFAULT_MODEL
from hypo.models.gguf import convert_gguf, embedded_gguf_path
from hypo.models.reference import Reference

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str | None, gguf_file: str | None = None) -> str:
    """Turn what the user gave into something `from_pretrained` loads fast.

    - None or `embedded:smollm2-135m-instruct`: the embedded GGUF, converted once.
    - a `.gguf` file, or a folder plus `gguf_file`: converted once.
    - a local folder or a hub id: returned unchanged.
    """
    if name_or_path in (None, "", DEFAULT_MODEL):
        return str(convert_gguf(embedded_gguf_path()))
    if gguf_file:
        return str(convert_gguf(Path(name_or_path) / gguf_file))
    if str(name_or_path).endswith(".gguf"):
        return str(convert_gguf(name_or_path))
    return str(name_or_path)


def load_tokenizer(path: str):
    """Tokenizer with a pad token and left padding (batched generation needs it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", attn_implementation: str | None = None):
    """Causal LM with dropout switched off (its config's dropout fields set to 0); `attn_implementation` as
    transformers reads it (None: transformers' choice)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    disable_dropout(model)
    return model


def add_fused_lm_head(model) -> None:
    """Give `model` (a transformers causal LM, not a peft wrapper) TRL's fused output layer, as TRL's DPOTrainer
    does: called with `labels` and `fused_lm_head=True` it returns the labels' log-probs, computed tile by tile
    in float32 without materializing the logits; called without, it is the model's own forward (generation is
    unchanged). See `hypo.objective.logprobs.completion_per_token_logps`."""
    try:
        from trl.trainer import add_fused_lm_head as trl_add_fused_lm_head
    except ImportError:
        raise ValueError("fused_lm_head uses TRL's fused output layer: pip install 'hypo[trl]' (trl>=1.16)") from None
    trl_add_fused_lm_head(model)


def check_adapters_float32(model) -> None:
    """LoRA trains its adapters: they must be float32 whatever the frozen base's dtype (peft casts bf16 adapters
    up by default; a float16 or bfloat16 adapter would lose AdamW's small updates)."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if low:
        raise ValueError(f"LoRA adapters in {', '.join(low)}: they must be float32 (peft's autocast_adapter_dtype)")


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (docs/design.md: the objective: dropout off in policy and reference)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def add_lora(model, *, r: int, alpha: int, dropout: float, target_modules: str | list[str]):
    """Wrap the policy with LoRA adapters; the reference is then the same model with adapters off."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if isinstance(target_modules, list) else (
        "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_policy_and_reference(config, checkpoint: Path | None = None):
    """Tokenizer, trainable policy, and the frozen reference of a `HyPOConfig`. Resuming, the policy comes
    from `checkpoint` (a `checkpoint-N` folder) and the reference stays the run's initial model."""
    policy_path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    tokenizer = load_tokenizer(policy_path)
    full_weights = str(checkpoint) if checkpoint is not None and not config.use_peft else policy_path
    policy = load_causal_lm(full_weights, config.dtype, config.attn_implementation)
    if config.fused_lm_head:
        add_fused_lm_head(policy)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if config.use_peft:
        if config.ref_model_name_or_path:
            raise ValueError("use_peft takes the base model as the reference; drop ref_model_name_or_path")
        if checkpoint is not None:
            from peft import PeftModel

            policy = PeftModel.from_pretrained(policy, str(checkpoint / "adapter"), is_trainable=True)
        else:
            policy = add_lora(policy, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                              target_modules=config.lora_target_modules)
        check_adapters_float32(policy)  # on a bfloat16 base too (dtype: the frozen base's)
        return tokenizer, policy, Reference(peft_policy=policy)
    if config.dtype == "auto" and any(p.dtype == torch.bfloat16 for p in policy.parameters()):
        logger.warning("dtype=auto loaded bfloat16 weights: AdamW updates smaller than about 1/256 of a weight "
                       "are rounded away; pass --dtype float32 (with --mixed_precision bf16) to keep every update")
    ref_path = resolve_model_path(config.ref_model_name_or_path) if config.ref_model_name_or_path else policy_path
    reference = load_causal_lm(ref_path, config.dtype, config.attn_implementation)
    if config.fused_lm_head:
        add_fused_lm_head(reference)
    return tokenizer, policy, Reference(reference)
