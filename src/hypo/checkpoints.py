"""Saving what a run produces: the model in Hugging Face format, from the main process."""

from __future__ import annotations

from pathlib import Path


def save_pretrained(model, tokenizer, directory: Path) -> Path:
    """Hugging Face format (loadable with from_pretrained); LoRA adapters are saved merged, and as an
    adapter folder beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # a peft model
        import copy

        model.save_pretrained(directory / "adapter")
        copy.deepcopy(model).merge_and_unload().save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def save_model(accelerator, policy, tokenizer, directory: Path) -> None:
    """Every process waits; the main process writes the unwrapped policy and the tokenizer."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pretrained(accelerator.unwrap_model(policy), tokenizer, directory)
