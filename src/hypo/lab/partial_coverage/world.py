"""The partial-coverage world on disk: a word-level tokenizer, a tiny Llama pretrained from scratch on the
reference response distribution (a plain torch loop: it builds the world model, it is not a product path),
and the data files every run of `hypo lab partial-coverage` shares.

`build_world(folder, seed)` writes, once (skipped when `world.json` exists):
- `model/`: the reference model and its tokenizer (Hugging Face format, loadable by `hypo train`);
- `pairs.jsonl` (512 pairs on 128 prompts), `heldout_pairs.jsonl` (128 pairs on the held-out prompts),
  `unlabeled.jsonl` (64 prompts), `eval_prompts.jsonl` (128 prompts): plain-string rows;
- `world.json`: the settings, the pretraining loss, and the model's own length distribution and positive
  rate on sampled responses next to the generator's.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from hypo.lab.partial_coverage import language as pc

MODEL = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 4}
PRETRAIN = {"texts": 16384, "epochs": 6, "batch_size": 64, "learning_rate": 3e-3, "warmup_steps": 50}


def build_tokenizer():
    """WordLevel over `pc.vocabulary()`: split on whitespace, decode joined by single spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(pc.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         **MODEL)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _batch(tokenizer, rows: list[tuple[str, str]]):
    """Right-padded prompt + response + EOS; labels only on the response and its EOS."""
    import torch

    ids, labels = [], []
    for prompt, response in rows:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    label = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    return input_ids, mask, label


def pretrain(model, tokenizer, texts: list[tuple[str, str]], seed: int, log=print) -> list[float]:
    """Next-token loss on the responses, AdamW with warm-up and cosine decay; returns the loss per epoch."""
    import torch

    settings = PRETRAIN
    rng = random.Random(seed)
    steps_per_epoch = len(texts) // settings["batch_size"]
    total = steps_per_epoch * settings["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < settings["warmup_steps"]:
            return (step + 1) / settings["warmup_steps"]
        return 0.5 * (1 + math.cos(math.pi * (step - settings["warmup_steps"]) / (total - settings["warmup_steps"])))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    for epoch in range(settings["epochs"]):
        order = list(range(len(texts)))
        rng.shuffle(order)
        epoch_losses = []
        for i in range(steps_per_epoch):
            rows = [texts[j] for j in order[i * settings["batch_size"] : (i + 1) * settings["batch_size"]]]
            input_ids, mask, labels = _batch(tokenizer, rows)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(loss.item())
        losses.append(statistics.mean(epoch_losses))
        log(f"  pretraining epoch {epoch + 1}: loss {losses[-1]:.4f}")
    model.eval()
    return losses


def response_stats(texts: list[str], clipped: list[bool] | None = None) -> dict[str, float]:
    """Length distribution and positive rate of responses (the check that the model matches the generator)."""
    lengths = [len(t.split()) for t in texts]
    clipped = clipped or [False] * len(texts)
    n = len(texts)
    return {"count": n, "mean_length": statistics.mean(lengths),
            "in_range": sum(pc.RANGE[0] <= x <= pc.RANGE[1] for x in lengths) / n,
            "short_tail": sum(x < pc.RANGE[0] for x in lengths) / n,
            "long_tail": sum(x > pc.RANGE[1] for x in lengths) / n,
            "off_range": sum(pc.is_off_range(t, c) for t, c in zip(texts, clipped, strict=True)) / n,
            "positive_rate": sum(pc.base_score(t) for t in texts) / max(1, sum(lengths)),
            "mean_base": statistics.mean(pc.base_score(t) for t in texts),
            "clipped": sum(clipped) / n}


def sample_model(model, tokenizer, prompts: list[str], per_prompt: int, max_new_tokens: int, seed: int):
    """Texts and clipped flags of `per_prompt` temperature-1 samples per prompt (hypo's own sampler)."""
    import torch

    from hypo.data.batches import PromptCollator
    from hypo.evaluation.held_out import completion_texts
    from hypo.models.tokens import stop_token_ids
    from hypo.sampling.generate import generate_completions

    collate = PromptCollator(tokenizer.pad_token_id)
    texts, clipped = [], []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), 32):
        items = [{"prompt_input_ids": tokenizer(p, add_special_tokens=False)["input_ids"], "index": i}
                 for i, p in enumerate(prompts[start : start + 32])]
        batch = collate(items)
        out = generate_completions(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                   num_generations=per_prompt, max_new_tokens=max_new_tokens,
                                   eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
        texts += completion_texts(tokenizer, out)
        clipped += out.clipped.tolist()
    return texts, clipped


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_world(folder: Path, seed: int = 0, log=print, pretrain_texts: int | None = None) -> dict[str, Any]:
    """Write the world (see the module docstring) unless `folder/world.json` exists; return its record."""
    import torch

    folder = Path(folder)
    record_path = folder / "world.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    split = pc.split_prompts(seed)
    pairs = pc.make_pairs(split.pairs, 4, seed + 1)
    _write_jsonl(folder / "pairs.jsonl", pairs)
    _write_jsonl(folder / "heldout_pairs.jsonl", pc.make_pairs(split.eval, 1, seed + 2))
    _write_jsonl(folder / "unlabeled.jsonl", [{"prompt": p} for p in split.unlabeled])
    _write_jsonl(folder / "eval_prompts.jsonl", [{"prompt": p} for p in split.eval])
    count = pretrain_texts or PRETRAIN["texts"]
    texts = pc.pretraining_texts(seed + 3, count, pc.all_prompts())
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    start = time.perf_counter()
    losses = pretrain(model, tokenizer, texts, seed, log=log)
    seconds = time.perf_counter() - start
    model.save_pretrained(folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "model")
    with torch.no_grad():
        sampled, clipped = sample_model(model, tokenizer, split.eval, 8, 40, seed + 4)
    rng = random.Random(seed + 5)
    record = {
        "seed": seed, "model": MODEL, "parameters": sum(p.numel() for p in model.parameters()),
        "pretraining": {**PRETRAIN, "texts": count, "loss_per_epoch": losses, "seconds": seconds},
        "generator": response_stats([pc.sample_response(rng) for _ in range(20000)]),
        "model_samples": response_stats(sampled, clipped),
        "pairs": response_stats([row[key] for row in pairs for key in ("chosen", "rejected")]),
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record
