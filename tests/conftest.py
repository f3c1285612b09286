"""Shared fixtures: a tiny Llama with a small byte-level BPE tokenizer trained in process, and small
preference / prompt files in TRL's formats. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Write a short review of the movie Northern Lights.",
    "Write a short review of the novel The Quiet Harbor.",
    "Write a short review of a small cafe by the river.",
    "Write a short review of a pair of running shoes.",
    "This is a great and lovely film, I enjoyed it a lot.",
    "A boring, slow and disappointing book. Not good at all.",
    "The coffee was excellent and the staff were friendly.",
    "Terrible shoes, they broke after a week.",
    "Wonderful, delightful, charming. Highly recommended!",
    "It was fine, nothing special, average in every way.",
]


def build_tokenizer(vocab_size: int = 320):
    """A real byte-level BPE tokenizer (ChatML template, EOS = pad = <|im_end|>) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(tokenizer, seed: int = 0, tie_word_embeddings: bool = True):
    """A 2-layer Llama with hidden size 32, randomly initialized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny model + tokenizer folder, loadable with from_pretrained and by `hypo train`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    """A TCP port free now, for the rendezvous of a multi-process test: a fixed port fails when another
    checkout runs the same test on the machine at the same time."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, Path]:
    """Pairs (conversational), unlabeled prompts and eval prompts for a few short reviews."""
    root = tmp_path_factory.mktemp("tiny-task")
    items = ["the movie Northern Lights", "the novel The Quiet Harbor", "a small cafe", "running shoes",
             "a board game", "a podcast", "a hotel", "a phone"]

    def user(item):
        return [{"role": "user", "content": f"Write a short review of {item}."}]

    pairs = [{"prompt": user(item), "chosen": [{"role": "assistant", "content": "Wonderful, I enjoyed it a lot."}],
              "rejected": [{"role": "assistant", "content": "Terrible and boring. Not good at all."}]}
             for item in items]
    return {
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": user(f"{i} again")} for i in items]),
        "eval_prompts": write_jsonl(root / "eval.jsonl", [{"prompt": user(f"{i}, briefly")} for i in items[:4]]),
    }
