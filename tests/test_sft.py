"""`hypo sft` end to end on the tiny model (TRL's SFTTrainer, a few steps, offline): the saved model loads,
learned something, ends completions with EOS, and carries a model card; and its data and config checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from hypo.cli.main import main
from hypo.data.files import DataError
from hypo.training.sft import SFTRunConfig, load_sft_rows

pytest.importorskip("trl")

TLDR = [{"prompt": f"SUBREDDIT: r/reviews\n\nTITLE: {item}\n\nPOST: Write a short review of {item}.\n\nTL;DR:",
         "completion": f" {summary}"}
        for item, summary in [("a cafe", "The coffee was excellent."), ("a phone", "Terrible, it broke."),
                              ("a hotel", "Lovely staff, great."), ("a book", "Boring and slow.")]]


def _completion_logp(model_dir, row) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tok(row["prompt"])["input_ids"]
    completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt) - 1:].sum())


def test_sft_command_trains_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "tldr.jsonl", TLDR)
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: {data}\nlearning_rate: 3.0e-3\n"
                      "per_device_train_batch_size: 4\nmax_steps: 6\nlogging_steps: 1\nmax_length: 512\n"
                      "warmup_ratio: 0.0\n")
    out = tmp_path / "run"
    assert main(["sft", "--config", str(config), "--output_dir", str(out)]) == 0
    model_dir = out / "model"
    before, after = _completion_logp(tiny_model_dir, TLDR[0]), _completion_logp(model_dir, TLDR[0])
    assert after > before + 1.0  # the completion (with its EOS) became much more likely
    card = (model_dir / "README.md").read_text()
    assert "supervised fine-tuning (TRL's SFTTrainer)" in card and "| learning_rate | `0.003` |" in card
    saved = json.loads((out / "sft_config.json").read_text())
    assert saved["max_steps"] == 6 and saved["dataset"] == str(data)


def test_trl_ends_each_completion_with_eos(tiny_tokenizer):
    """HyPO's samples stop at EOS only if the SFT model learned to emit it: TRL appends it (checked here on
    TRL's own tokenization of prompt-completion rows)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from conftest import build_model

    trainer = SFTTrainer(model=build_model(tiny_tokenizer), processing_class=tiny_tokenizer,
                         args=SFTConfig(output_dir="/tmp/unused-sft", use_cpu=True, bf16=False, report_to="none",
                                        max_length=512),
                         train_dataset=datasets.Dataset.from_list(TLDR))
    example = trainer.train_dataset[0]
    prompt = tiny_tokenizer(TLDR[0]["prompt"])["input_ids"]
    assert example["input_ids"][-1] == tiny_tokenizer.eos_token_id and example["input_ids"][:len(prompt)] == prompt
    assert example["labels"][: len(prompt)] == [-100] * len(prompt)  # the loss is on the completion only
    assert example["labels"][len(prompt):] == example["input_ids"][len(prompt):]


def test_sft_rows_and_config_are_checked(tmp_path):
    assert load_sft_rows(str(write_jsonl(tmp_path / "a.jsonl", TLDR)))[0] == TLDR[0]
    messages = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert load_sft_rows(str(write_jsonl(tmp_path / "m.jsonl", messages))) == messages
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [TLDR[0], {"text": "plain"}])
    with pytest.raises(DataError, match="mixed.jsonl: row 2: has text, but .* has prompt, completion"):
        load_sft_rows(str(mixed))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{**TLDR[0], "completion": ""}])
    with pytest.raises(DataError, match="row 1: field 'completion'"):
        load_sft_rows(str(empty))
    with pytest.raises(ValueError, match="dataset is required"):
        SFTRunConfig()
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        SFTRunConfig(dataset="x", learning_rate="1e-5")
    assert SFTRunConfig(dataset="x", num_train_epochs=2).num_train_epochs == 2.0
