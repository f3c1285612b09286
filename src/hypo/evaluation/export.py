"""Generations in the formats of the standard evaluators: AlpacaEval 2 and MT-Bench (FastChat's llm_judge).

`hypo export --model M --format alpaca_eval|mt_bench --questions FILE --output FILE` generates the model's
answers; the evaluators then judge them (their judges, their API keys):

* **AlpacaEval 2** (github.com/tatsu-lab/alpaca_eval): `alpaca_eval --model_outputs outputs.json` reads a JSON
  list of `{"instruction", "output", "generator"}` (plus `"dataset"` when the question has it), one per
  instruction of its evaluation set (the 805 instructions of `alpaca_eval.json` in the Hub dataset
  `tatsu-lab/alpaca_eval`); `generator` names the model. Rows in hypo's prompt format (`prompt`) are
  accepted too, for a custom set judged with `--reference_outputs`.
* **MT-Bench** (github.com/lm-sys/FastChat, `fastchat/llm_judge`): questions are `question.jsonl` lines
  `{"question_id", "category", "turns": [first, second]}`; answers are `model_answer/<model_id>.jsonl` lines
  `{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [answer_1, answer_2]}],
  "tstamp"}` (what `gen_model_answer.py` writes and `gen_judgment.py` reads). The second answer is generated
  with the first question and answer in the conversation, through the model's chat template; the sampling
  temperature of each category is FastChat's (`temperature_config`; 0 means greedy).

Decoding is set in full here (temperature, top_p; no top-k, no repetition penalty) rather than inherited from
the model's generation defaults, and stops at the tokenizer's EOS and the model's own stop tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
"""FastChat's `temperature_config` (fastchat/llm_judge/common.py); other categories get 0.7 there too."""
MT_BENCH_DEFAULT_TEMPERATURE = 0.7
FORMATS = ("alpaca_eval", "mt_bench")

Messages = list[dict[str, str]]
AnswerFn = Callable[[list[Messages], list[float]], list[str]]
"""(conversations, one temperature each) -> the assistant's next message for each."""


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's own stop tokens (Llama 3 Instruct ends turns with <|eot_id|>,
    which its generation config lists beside the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: Sequence[Messages], *, temperature: float, top_p: float = 1.0,
                     max_new_tokens: int, batch_size: int, seed: int) -> list[str]:
    """The assistant's next message for each conversation: the chat template with a generation prompt,
    left-padded batches, greedy when `temperature` is 0, else sampled (seeded per batch); the text is
    decoded without special tokens and stripped."""
    from transformers import GenerationConfig

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: the evaluators' questions are chat turns")
    greedy = temperature == 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=1,
                              temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=0,
                              repetition_penalty=1.0, eos_token_id=stop_token_ids(model, tokenizer),
                              pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in conversations[start : start + batch_size]]
            batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                              return_tensors="pt").to(device)
            torch.manual_seed(seed + start)
            out = model.generate(**batch, generation_config=config)  # (B, P + new)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return replies


def model_answer_fn(model, tokenizer, *, max_new_tokens: int, batch_size: int, seed: int,
                    top_p: float = 1.0) -> AnswerFn:
    """An `AnswerFn` over `model`: the conversations of each temperature generated together."""

    def answer(conversations: list[Messages], temperatures: list[float]) -> list[str]:
        replies: list[str | None] = [None] * len(conversations)
        for temperature in sorted(set(temperatures)):
            chosen = [i for i, t in enumerate(temperatures) if t == temperature]
            texts = generate_replies(model, tokenizer, [conversations[i] for i in chosen], temperature=temperature,
                                     top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
            for i, text in zip(chosen, texts, strict=True):
                replies[i] = text
        return replies

    return answer


def _instruction(row: Any, number: int, source: str) -> str:
    """AlpacaEval's `instruction`, or hypo's `prompt` (a string, or the last user message of a conversation)."""
    from hypo.evaluation.held_out import prompt_text

    value = row.get("instruction", row.get("prompt")) if isinstance(row, dict) else None
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):
        value = prompt_text(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: row {number}: expected a non-empty 'instruction' (AlpacaEval) or 'prompt'")
    return value


def alpaca_eval_outputs(rows: Sequence[dict], answer: AnswerFn, *, generator: str, temperature: float,
                        source: str = "<questions>") -> list[dict[str, Any]]:
    """One AlpacaEval record per question: instruction, the model's output, the generator's name and the
    question's `dataset` when it has one."""
    instructions = [_instruction(row, number, source) for number, row in enumerate(rows, 1)]
    outputs = answer([[{"role": "user", "content": text}] for text in instructions], [temperature] * len(rows))
    records = []
    for row, instruction, output in zip(rows, instructions, outputs, strict=True):
        record = {"instruction": instruction, "output": output, "generator": generator}
        if isinstance(row.get("dataset"), str):
            record["dataset"] = row["dataset"]
        records.append(record)
    return records


def _check_question(row: Any, number: int, source: str) -> None:
    turns = row.get("turns") if isinstance(row, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f"{source}: row {number}: field 'turns': expected a list of question texts (MT-Bench's "
                         "question.jsonl)")
    if "question_id" not in row:
        raise ValueError(f"{source}: row {number}: field 'question_id': missing")


def mt_bench_answers(questions: Sequence[dict], answer: AnswerFn, *, model_id: str,
                     temperature: float | None = None, source: str = "<questions>") -> list[dict[str, Any]]:
    """FastChat model answers: every question's turns answered in order, each turn with the conversation so
    far (all questions' first turns are generated together, then their second turns, ...). `temperature`
    None: FastChat's per-category temperatures."""
    for number, question in enumerate(questions, 1):
        _check_question(question, number, source)
    temperatures = [MT_BENCH_TEMPERATURES.get(q.get("category"), MT_BENCH_DEFAULT_TEMPERATURE)
                    if temperature is None else temperature for q in questions]
    conversations: list[Messages] = [[] for _ in questions]
    turns: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        replies = answer([list(conversations[i]) for i in active], [temperatures[i] for i in active])
        for i, reply in zip(active, replies, strict=True):
            conversations[i].append({"role": "assistant", "content": reply})
            turns[i].append(reply)
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": t}], "tstamp": time.time()} for q, t in zip(questions, turns, strict=True)]


def write_outputs(records: list[dict[str, Any]], path: str | Path, fmt: str) -> Path:
    """AlpacaEval: one JSON list; MT-Bench: JSON lines (FastChat appends and reads line by line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "alpaca_eval":
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
