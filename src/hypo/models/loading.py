"""Load the policy, the reference and the tokenizer: hub id, local folder, GGUF file, the embedded default, or
objects already loaded (`GivenModels`: what `HyPOTrainer` was handed).

A GGUF model (the embedded SmolLM2-135M-Instruct included) is converted once to a safetensors folder
(`hypo.models.gguf`) and loaded from there. Dropout is switched off at load time (docs/design.md: the
objective); LoRA adapters come from peft, and the reference of a LoRA run is the base model with its
adapters disabled (`hypo.models.reference`). A loaded model's reference is a frozen deep copy of it, unless a
reference is given, or the base with adapters disabled under LoRA (TRL's rules).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Set every dropout probability to 0 (docs/design.md: the objective: dropout off in policy and reference);
    LoRA's own dropout (`lora_dropout`, a setting of the adapters) is left as configured."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
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




@dataclass(frozen=True)
class GivenModels:
    """Objects handed over instead of paths (`HyPOTrainer`'s `model`, `ref_model`, `processing_class`,
    `peft_config`); None where the config's path applies."""

    model: Any = None  # a loaded causal LM (a transformers model, or a peft PeftModel)
    ref_model: Any = None  # a loaded reference model
    tokenizer: Any = None
    peft_config: Any = None  # a peft config (e.g. LoraConfig) to wrap the policy with


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def model_source_path(model) -> str | None:
    """Where a loaded model was loaded from (its `name_or_path`: a folder or a hub id), None when unknown."""
    config = getattr(model, "config", None)
    path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(path) if path else None


def load_saved_weights(model, directory: Path) -> None:
    """Load weights written by `save_pretrained` in `directory` into `model`, in place (a resumed run, a KL
    budget's kept state): a LoRA model takes the adapter in `directory/adapter`, any other model the safetensors
    files (one, or the shards of `model.safetensors.index.json`). Weights tied to a loaded one (an output layer
    tied to the embeddings) may be absent from the files; any other missing or unexpected name is an error."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if is_peft_model(model):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(directory / "adapter")))
        return
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(parameters[key]) for key in state if key in parameters}
    untied = [key for key in missing if key not in parameters or id(parameters[key]) not in loaded]
    if untied or unexpected:
        raise ValueError(f"{directory}: the saved weights do not fit the model (missing: {untied[:5]}, unexpected: "
                         f"{list(unexpected)[:5]})")


def _check_weight_dtype(policy, dtype_option: str, given: bool, lora: bool = False) -> None:
    """Refuse handed-over float16 weights; warn about bfloat16 weights that train (under LoRA the bf16 base is
    frozen and the adapters are float32, checked after they are added: nothing to warn about)."""
    dtypes = {p.dtype for p in policy.parameters()}
    if given and torch.float16 in dtypes:
        raise ValueError("model: float16 weights are refused (updates are rounded away and gradients overflow "
                         "silently); load the model in float32 and use mixed_precision=fp16")
    if (given or dtype_option == "auto") and torch.bfloat16 in dtypes and not lora:
        logger.warning("the policy has bfloat16 weights: AdamW updates smaller than about 1/256 of a weight are "
                       "rounded away; load it in float32 (with mixed_precision bf16) to keep every update")


def load_policy_and_reference(config, checkpoint: Path | None = None, given: GivenModels | None = None):
    """Tokenizer, trainable policy, and the frozen reference of a `HyPOConfig`, or of the objects `given`.
    Resuming, the policy's weights come from `checkpoint` (a `checkpoint-N` folder) and the reference stays the
    run's initial model. LoRA (`config.use_peft`, `given.peft_config`, or a given PeftModel): the reference is the
    base with adapters disabled, and no reference model may be given."""
    given = given or GivenModels()
    policy_path = resolve_model_path(config.model_name_or_path, config.gguf_file) if given.model is None else None
    tokenizer = run_tokenizer(config, given)
    lora = uses_lora(config, given)
    if given.model is None:
        full_weights = str(checkpoint) if checkpoint is not None and not lora else policy_path
        policy = load_causal_lm(full_weights, config.dtype, config.attn_implementation)
    else:
        policy = given.model
        disable_dropout(policy)
    _check_weight_dtype(policy, config.dtype, given.model is not None, lora)
    # the reference of a loaded model is its initial state: copied before any checkpoint's weights come in
    copied_reference = copy.deepcopy(policy) if given.model is not None and not lora and \
        given.ref_model is None and not config.ref_model_name_or_path else None
    if given.model is not None and checkpoint is not None and not lora:
        load_saved_weights(policy, checkpoint)
    if config.fused_lm_head:
        add_fused_lm_head(policy.get_base_model() if is_peft_model(policy) else policy)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if lora:
        policy = _lora_policy(policy, config, given, checkpoint)
        check_adapters_float32(policy)  # on a bfloat16 base too (dtype: the frozen base's)
        return tokenizer, policy, Reference(peft_policy=policy)
    if given.ref_model is not None:
        reference = given.ref_model
        disable_dropout(reference)
    elif copied_reference is not None:
        reference = copied_reference
    else:
        ref_path = resolve_model_path(config.ref_model_name_or_path) if config.ref_model_name_or_path else policy_path
        reference = load_causal_lm(ref_path, config.dtype, config.attn_implementation)
    if config.fused_lm_head:
        add_fused_lm_head(reference)
    return tokenizer, policy, Reference(reference)


def run_tokenizer(config, given: GivenModels | None = None):
    """The run's tokenizer: the one handed over (`processing_class`, given a pad token if it has none), or the one
    saved with the policy's weights (its path, or where a handed-over model was loaded from)."""
    given = given or GivenModels()
    if given.tokenizer is None:
        path = resolve_model_path(config.model_name_or_path, config.gguf_file) if given.model is None else None
        return load_tokenizer(path or _tokenizer_path(given.model))
    if given.tokenizer.pad_token is None:
        given.tokenizer.pad_token = given.tokenizer.eos_token
    return given.tokenizer


def uses_lora(config, given: GivenModels | None = None) -> bool:
    """Whether the policy trains LoRA adapters (`use_peft`, a given peft config or PeftModel); a ValueError if a
    reference model is given too (LoRA's reference is the base with its adapters disabled)."""
    given = given or GivenModels()
    lora = config.use_peft or given.peft_config is not None or is_peft_model(given.model)
    if lora and (config.ref_model_name_or_path or given.ref_model is not None):
        raise ValueError("LoRA takes the base model with adapters disabled as the reference; drop the reference "
                         "model (ref_model / ref_model_name_or_path)")
    return lora


def _tokenizer_path(model) -> str:
    path = model_source_path(model)
    if path is None:
        raise ValueError("processing_class: pass the tokenizer; the model does not say where it was loaded from")
    return path


def _lora_policy(policy, config, given: GivenModels, checkpoint: Path | None):
    """The LoRA policy: a given PeftModel as it is, or the base wrapped with `given.peft_config` (or the config's
    LoRA settings); resuming, the adapter weights come from `checkpoint/adapter`."""
    if is_peft_model(policy):
        if checkpoint is not None:
            load_saved_weights(policy, checkpoint)
        return policy
    if checkpoint is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(policy, str(checkpoint / "adapter"), is_trainable=True)
    if given.peft_config is not None:
        from peft import get_peft_model

        return get_peft_model(policy, given.peft_config)
    return add_lora(policy, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    target_modules=config.lora_target_modules)
