"""Preference and prompt datasets: validation, tokenization and batching.

Rows follow TRL's formats (extra keys are ignored):

* preference, standard: ``{"prompt": str, "chosen": str, "rejected": str}``
* preference, conversational: ``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen``
  and ``rejected`` are each a list holding exactly one ``{"role": "assistant", ...}`` message
* prompt-only: ``{"prompt": str}`` or ``{"prompt": [messages]}``

A source is a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a folder (written by
``datasets.save_to_disk`` or holding data files), or a Hugging Face Hub dataset name, read by
:mod:`hypo.datafiles`. Every problem with a row raises :class:`DataError` whose message names the file, the 1-based row number and the
field, e.g. ``pairs.jsonl: row 7: field 'chosen': empty text``. In JSONL and CSV files the row number
is the line number (a CSV header is line 1; a CSV row with a quoted line break is numbered by its first
line); in a folder of data files each message names the file. Files must be UTF-8: other bytes are an
error naming the row and field. CSV is read with the header's columns, every value a string.

All rows of a source share one format: a plain-text row in conversational data (or the reverse) is an
error naming the first row that differs. Pairs whose chosen and rejected are the same text (up to
surrounding whitespace) carry no preference and would only add noise to the batch statistics: they are
dropped with a warning that counts them and names the first rows, and :class:`LoadReport` records them.
:func:`check_preference_source` and :func:`check_prompt_source` validate a whole source without a
tokenizer or a model, so a run can check all its data before it loads anything heavy.

Tokenization mirrors what the policy sees and generates: the prompt is the raw text (tokenizer
special tokens such as BOS added) or the chat template applied with a generation prompt; a
completion is its text without special tokens followed by ``eos_token_id``. Prompts are truncated on
the left, completions on the right.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from hypo.datafiles import FILE_SUFFIXES, JSON_LIST_KEYS, DataError, read_located_rows, read_rows

__all__ = [  # the reading side lives in hypo.datafiles; these names stay importable from here
    "FILE_SUFFIXES", "JSON_LIST_KEYS", "DataError", "LoadReport", "PairCollator", "PromptCollator",
    "check_preference_source", "check_prompt_source", "load_preference_data", "load_prompt_data",
    "pad_sequences", "prompts_from_preference_rows", "read_rows", "render_prompt", "tokenize_preference_rows",
    "tokenize_prompt_rows", "validate_preference_row",
]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_TYPE_HINT = "expected a string or a list of {role, content} messages"
_COMPLETION_HINT = "a conversational completion must be a list with one assistant message"
_RowEncoder = Callable[[Any, str], tuple[dict, int, int]]


@dataclass
class LoadReport:
    """Counts from loading or checking one dataset (truncation counts cover kept rows only and stay 0
    in a check without a tokenizer). ``rows_read = rows_kept + rows_skipped + rows_identical``."""

    source: str
    rows_read: int
    rows_kept: int
    rows_skipped: int
    prompts_truncated: int
    completions_truncated: int
    rows_identical: int = 0
    """Preference pairs dropped because chosen and rejected are the same text (no preference signal)."""
    identical_rows: list[str] = field(default_factory=list)
    """Where the first of them are (up to ten), e.g. ``pairs.jsonl: row 7``."""


# --------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _check_row_object(row: Any, where: str) -> None:
    if isinstance(row, DataError):  # an unreadable line kept by _read_numbered(strict=False)
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a 'prompt' field, got {_type_name(row)}")


def _check_prompt(row: dict, where: str) -> bool:
    """Validate ``row["prompt"]``; return True when it is conversational (a message list)."""
    prompt = row.get("prompt")
    if prompt is None:
        raise DataError(f"{where}: field 'prompt': missing")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt': empty text")
        return False
    if not isinstance(prompt, list):
        raise DataError(f"{where}: field 'prompt': {_TYPE_HINT}, got {_type_name(prompt)}")
    if not prompt:
        raise DataError(f"{where}: field 'prompt': empty message list")
    for position, message in enumerate(prompt, start=1):
        if not _is_message(message):
            raise DataError(
                f"{where}: field 'prompt': message {position}: expected {{role, content}} with string values"
            )
    return True


def _completion_text(row: dict, field: str, conversational: bool, where: str) -> str:
    """Validate a completion field against the prompt's format and return its text."""
    value = row.get(field)
    if value is None:
        raise DataError(f"{where}: field '{field}': missing")
    if isinstance(value, str):
        if conversational:
            raise DataError(
                f"{where}: field '{field}': a string, but 'prompt' is a message list (mixed formats)"
            )
        text = value
    elif isinstance(value, list):
        if not conversational:
            raise DataError(
                f"{where}: field '{field}': a message list, but 'prompt' is a string (mixed formats)"
            )
        if len(value) != 1 or not _is_message(value[0]) or value[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}': {_COMPLETION_HINT}")
        text = value[0]["content"]
    else:
        raise DataError(f"{where}: field '{field}': {_TYPE_HINT}, got {_type_name(value)}")
    if not text.strip():
        raise DataError(f"{where}: field '{field}': empty text")
    return text


def _preference_texts(row: Any, where: str) -> tuple[bool, str, str]:
    _check_row_object(row, where)
    conversational = _check_prompt(row, where)
    chosen = _completion_text(row, "chosen", conversational, where)
    rejected = _completion_text(row, "rejected", conversational, where)
    return conversational, chosen, rejected


def validate_preference_row(row: Any, *, source: str = "<rows>", row_number: int = 1) -> bool:
    """Raise :class:`DataError` if ``row`` is not a valid preference row; return True if conversational."""
    return _preference_texts(row, f"{source}: row {row_number}")[0]


class _IdenticalPair(Exception):
    """A valid pair whose chosen and rejected are the same text: it is dropped, not an error."""


def _pair_texts(row: Any, where: str) -> tuple[str, str]:
    """Chosen and rejected text of a valid preference row with a preference in it."""
    _, chosen, rejected = _preference_texts(row, where)
    if chosen.strip() == rejected.strip():
        raise _IdenticalPair(where)
    return chosen, rejected


def _check_preference_row(row: Any, where: str) -> tuple[dict, int, int]:
    """The row encoder of a check without a tokenizer: validation only."""
    _pair_texts(row, where)
    return {"prompt": row["prompt"]}, 0, 0


def _check_prompt_row(row: Any, where: str) -> tuple[dict, int, int]:
    _check_row_object(row, where)
    _check_prompt(row, where)
    return {"prompt": row["prompt"]}, 0, 0


# --------------------------------------------------------------------------- tokenization


def render_prompt(prompt: str | list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """Prompt text as the policy sees it: a string as is, messages through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so conversational prompts cannot be rendered")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode_prompt(prompt: str | list[dict], tokenizer: PreTrainedTokenizerBase, where: str) -> list[int]:
    # Chat templates already contain their special tokens; raw text gets the tokenizer's own (e.g. BOS).
    text = render_prompt(prompt, tokenizer)
    ids = list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])
    if not ids:
        raise DataError(f"{where}: field 'prompt': no tokens")
    return ids


def _encode_completion(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def _keep_last(ids: list[int], limit: int | None) -> tuple[list[int], bool]:
    if limit is None or len(ids) <= limit:
        return ids, False
    return ids[-limit:], True


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _check_tokenizer(
    rows: Sequence[Any], tokenizer: PreTrainedTokenizerBase, source: str, *, eos: bool
) -> None:
    if eos and tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no eos_token_id, which completions end with")
    conversational = any(isinstance(row, dict) and isinstance(row.get("prompt"), list) for row in rows)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the data is conversational but the tokenizer has no chat template")


def _encode_preference_row(
    row: Any,
    where: str,
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    max_prompt_length: int | None,
    max_completion_length: int | None,
) -> tuple[dict, int, int]:
    """One preference row -> (item without index, prompts truncated, completions truncated)."""
    chosen_text, rejected_text = _pair_texts(row, where)
    prompt_ids, prompt_cut = _keep_last(_encode_prompt(row["prompt"], tokenizer, where), max_prompt_length)
    limit = max_completion_length
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(
                f"{where}: field 'prompt': {len(prompt_ids)} tokens leave no room for a completion "
                f"within max_length={max_length}"
            )
        limit = room if limit is None else min(limit, room)
    completions = []
    completions_cut = 0
    for text in (chosen_text, rejected_text):
        ids = _encode_completion(text, tokenizer)
        if limit is not None and len(ids) > limit:
            ids = ids[:limit]
            completions_cut += 1
        completions.append(ids)
    item = {
        "prompt_input_ids": prompt_ids,
        "chosen_input_ids": completions[0],
        "rejected_input_ids": completions[1],
        "prompt": row["prompt"],
    }
    return item, int(prompt_cut), completions_cut


def _encode_prompt_row(
    row: Any, where: str, *, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None
) -> tuple[dict, int, int]:
    _check_prompt_row(row, where)
    prompt_ids, prompt_cut = _keep_last(_encode_prompt(row["prompt"], tokenizer, where), max_prompt_length)
    return {"prompt_input_ids": prompt_ids, "prompt": row["prompt"]}, int(prompt_cut), 0


def _format_name(conversational: bool) -> str:
    return "conversational (a message list)" if conversational else "plain text"


def _shorten(wheres: Sequence[str], source: str) -> str:
    return ", ".join(where.removeprefix(f"{source}: ") for where in wheres)


def _encode_rows(
    rows: Sequence[Any],
    encode: _RowEncoder,
    *,
    source: str,
    wheres: Sequence[str],
    skip_bad_rows: bool,
    tokenized: bool = True,
) -> tuple[list[dict], LoadReport]:
    """Run ``encode`` over all rows, skipping or raising on bad ones, and build the report.

    Pairs with identical chosen and rejected are dropped with a warning. All rows must share one format:
    a conversational row in plain-text data (or the reverse) is an error even with ``skip_bad_rows``.
    """
    if not rows:
        raise DataError(f"{source}: no rows")
    if len(wheres) != len(rows):
        raise ValueError(f"row_numbers or row_locations has {len(wheres)} entries for {len(rows)} rows")
    items: list[dict] = []
    errors: list[DataError] = []
    identical: list[str] = []
    first: tuple[bool, str] | None = None  # (conversational, where) of the first good row
    prompts_cut = completions_cut = 0
    for row, where in zip(rows, wheres, strict=True):
        try:
            item, prompt_cut, completion_cut = encode(row, where)
        except _IdenticalPair:
            identical.append(where)
            continue
        except DataError as exc:
            if not skip_bad_rows:
                raise
            errors.append(exc)
            continue
        conversational = isinstance(item["prompt"], list)
        if first is None:
            first = (conversational, where)
        elif conversational != first[0]:
            raise DataError(
                f"{where}: field 'prompt': {_format_name(conversational)}, but {_shorten([first[1]], source)} is "
                f"{_format_name(first[0])}: a dataset must not mix plain-text and conversational rows"
            )
        item["index"] = len(items)
        items.append(item)
        prompts_cut += prompt_cut
        completions_cut += completion_cut
    if errors:
        logger.warning("%s: skipped %d of %d bad rows (first: %s)", source, len(errors), len(rows), errors[0])
    if identical:
        logger.warning(
            "%s: dropped %d of %d pairs whose chosen and rejected are identical (no preference signal): %s%s",
            source, len(identical), len(rows), _shorten(identical[:5], source), ", ..." if len(identical) > 5 else "",
        )
    if not items:
        if not identical:
            raise DataError(f"{source}: all {len(rows)} rows are bad (first: {errors[0]})")
        raise DataError(f"{source}: no usable rows: {len(errors)} bad, {len(identical)} with identical chosen and "
                        f"rejected ({_shorten(identical[:5], source)})" + (f"; first bad: {errors[0]}" if errors else ""))
    if tokenized:
        logger.info("%s: %d rows kept, %d prompts and %d completions truncated", source, len(items), prompts_cut,
                    completions_cut)
    report = LoadReport(source, len(rows), len(items), len(errors), prompts_cut, completions_cut,
                        rows_identical=len(identical), identical_rows=identical[:10])
    return items, report


def _wheres(source: str, count: int, row_numbers: Sequence[int] | None,
            row_locations: Sequence[str] | None) -> list[str]:
    if row_locations is not None:
        return list(row_locations)
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, count + 1))
    return [f"{source}: row {number}" for number in numbers]


def tokenize_preference_rows(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str = "<rows>",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    skip_bad_rows: bool = False,
    row_numbers: Sequence[int] | None = None,
    row_locations: Sequence[str] | None = None,
) -> tuple[list[dict], LoadReport]:
    """Validate and tokenize preference rows.

    Items: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of ints),
    ``prompt`` (the original field) and ``index`` (position in the returned list). Truncation: the
    prompt keeps its last ``max_prompt_length`` tokens, each completion its first
    ``max_completion_length``, then completions are cut to fit ``max_length`` after the prompt.
    ``row_numbers`` gives the 1-based numbers used in messages (default: position + 1);
    ``row_locations`` replaces ``"<source>: row <n>"`` whole (rows from several files).
    Pairs whose chosen and rejected are the same text are dropped with a warning (see
    :class:`LoadReport`); plain-text and conversational rows must not be mixed.
    """
    _check_limits(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
    )
    _check_tokenizer(rows, tokenizer, source, eos=True)
    encode = partial(
        _encode_preference_row,
        tokenizer=tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
    )
    wheres = _wheres(source, len(rows), row_numbers, row_locations)
    return _encode_rows(rows, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)


def tokenize_prompt_rows(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str = "<rows>",
    max_prompt_length: int | None = None,
    skip_bad_rows: bool = False,
    row_numbers: Sequence[int] | None = None,
    row_locations: Sequence[str] | None = None,
) -> tuple[list[dict], LoadReport]:
    """Validate and tokenize prompt-only rows (other keys are ignored).

    Items: ``prompt_input_ids``, ``prompt`` (the original field) and ``index``. A prompt longer than
    ``max_prompt_length`` keeps its last tokens. ``row_numbers`` and ``row_locations``: as in
    :func:`tokenize_preference_rows`.
    """
    _check_limits(max_prompt_length=max_prompt_length)
    _check_tokenizer(rows, tokenizer, source, eos=False)
    encode = partial(_encode_prompt_row, tokenizer=tokenizer, max_prompt_length=max_prompt_length)
    wheres = _wheres(source, len(rows), row_numbers, row_locations)
    return _encode_rows(rows, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)


def load_preference_data(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "train",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[dict], LoadReport]:
    """Read ``source`` and tokenize it as preference pairs (see :func:`tokenize_preference_rows`)."""
    rows, wheres = read_located_rows(source, split=split, strict=False)  # bad rows raise in order below
    return tokenize_preference_rows(
        rows,
        tokenizer,
        source=source,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        skip_bad_rows=skip_bad_rows,
        row_locations=wheres,
    )


def load_prompt_data(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "train",
    max_prompt_length: int | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[dict], LoadReport]:
    """Read ``source`` and tokenize its prompts (see :func:`tokenize_prompt_rows`)."""
    rows, wheres = read_located_rows(source, split=split, strict=False)  # bad rows raise in order below
    return tokenize_prompt_rows(
        rows,
        tokenizer,
        source=source,
        max_prompt_length=max_prompt_length,
        skip_bad_rows=skip_bad_rows,
        row_locations=wheres,
    )


def check_preference_source(source: str, *, split: str = "train", skip_bad_rows: bool = False) -> LoadReport:
    """Read and validate every row of a preference source (every file of a folder) without a tokenizer
    or a model, so that a run can check all its data before loading anything heavy.

    The same rules and messages as :func:`load_preference_data` (which the tokenizer may still refuse
    for reasons of its own: a missing chat template, a prompt that leaves no room within
    ``max_length``); the report's truncation counts are 0. Raises :class:`DataError`.
    """
    rows, wheres = read_located_rows(source, split=split, strict=False)  # bad rows raise in order below
    encode = _check_preference_row
    return _encode_rows(rows, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows, tokenized=False)[1]


def check_prompt_source(source: str, *, split: str = "train", skip_bad_rows: bool = False) -> LoadReport:
    """Read and validate every row of a prompt-only source without a tokenizer or a model (see
    :func:`check_preference_source`); rules and messages as :func:`load_prompt_data`."""
    rows, wheres = read_located_rows(source, split=split, strict=False)  # bad rows raise in order below
    encode = _check_prompt_row
    return _encode_rows(rows, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows, tokenized=False)[1]


def prompts_from_preference_rows(rows: Sequence[dict]) -> list[dict]:
    """Prompt-only rows ``{"prompt": ...}`` with each distinct prompt once, in first-seen order.

    Works on raw preference rows and on items from :func:`load_preference_data` alike; rows without
    a ``prompt`` are left out.
    """
    seen: set[str] = set()
    prompts: list[dict] = []
    for row in rows:
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if prompt is None:
            continue
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)
        if key not in seen:
            seen.add(key)
            prompts.append({"prompt": prompt})
    return prompts


# --------------------------------------------------------------------------- batching


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to the longest one, on the left or the right.

    Shape: returns ``input_ids`` and ``attention_mask``, both (B, T) long, T = longest sequence.
    """
    width = max((len(seq) for seq in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


class PromptCollator:
    """Batch prompt items: prompts left-padded so generation continues right after them.

    Shape: ``prompt_input_ids`` / ``prompt_attention_mask`` (B, P), ``index`` (B,).
    """

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (set tokenizer.pad_token)")
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        prompt_ids, prompt_mask = pad_sequences(
            [item["prompt_input_ids"] for item in items], self.pad_token_id, left=True
        )  # (B, P)
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)  # (B,)
        return {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask, "index": index}


class PairCollator(PromptCollator):
    """Batch preference items: prompts left-padded, completions right-padded.

    Shape: ``prompt_*`` (B, P), ``chosen_*`` (B, C), ``rejected_*`` (B, R), ``index`` (B,);
    attention masks are 0/1 long tensors.
    """

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        for name in ("chosen", "rejected"):
            ids, mask = pad_sequences(
                [item[f"{name}_input_ids"] for item in items], self.pad_token_id, left=False
            )  # (B, C) / (B, R)
            batch[f"{name}_input_ids"] = ids
            batch[f"{name}_attention_mask"] = mask
        return batch


# --- the data of one training run ---------------------------------------------------------------------------


@dataclass
class TrainingData:
    pairs: list[dict]
    prompts: list[dict] | None  # unlabeled prompts for the online term (HyPO only)
    eval_prompts: list[dict] | None
    judge: str | None


def load_training_data(config, tokenizer: PreTrainedTokenizerBase, *, with_prompts: bool) -> TrainingData:
    """Pairs, unlabeled prompts (`with_prompts`: the online term needs them) and held-out prompts of a
    `HyPOConfig`: the bundled task's unless the user gives them."""
    pairs_source, prompts_source, eval_source, judge = config.dataset, config.prompts, config.eval_prompts, config.judge
    if pairs_source is None:
        from hypo.tasks import get_task

        task = get_task(config.task)
        pairs_source, judge = str(task.pairs), judge or task.judge
        prompts_source = prompts_source or str(task.prompts)
        eval_source = eval_source or str(task.eval_prompts)
    lengths = {"max_prompt_length": config.max_prompt_length, "skip_bad_rows": config.skip_bad_rows}
    pairs, _ = load_preference_data(pairs_source, tokenizer, split=config.dataset_split, max_length=config.max_length,
                                    max_completion_length=config.max_completion_length, **lengths)
    prompts = None
    if with_prompts and prompts_source:
        prompts, _ = load_prompt_data(prompts_source, tokenizer, split=config.prompts_split, **lengths)
    elif with_prompts:
        prompts, _ = tokenize_prompt_rows(prompts_from_preference_rows(pairs), tokenizer, source=pairs_source,
                                          **lengths)
    eval_prompts = load_prompt_data(eval_source, tokenizer, **lengths)[0] if eval_source else None
    return TrainingData(pairs, prompts, eval_prompts, judge)


class ShuffledBatches:
    """Endless batches of `items` in a seeded random order, reshuffled every epoch, for one process of
    `num_processes`. The order is the one a shuffling `DataLoader` with a generator seeded with `seed` draws,
    epoch after epoch from the same generator (tested equal); full batches only. Process i takes global
    batches i, i + P, i + 2P, ... The position is a number of batches, so a resumed run continues exactly
    where it stopped: `start` is how many batches this process has already taken.
    """

    def __init__(self, items: list[dict], batch_size: int, collate_fn, *, seed: int, what: str,
                 process_index: int = 0, num_processes: int = 1, device: torch.device | str = "cpu",
                 start: int = 0) -> None:
        self.batches_per_epoch = len(items) // batch_size // num_processes * num_processes
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(items)} {what} is fewer than one batch of {batch_size} on each of "
                             f"{num_processes} process(es)")
        self.items, self.batch_size, self.collate_fn, self.device = items, batch_size, collate_fn, device
        self.seed, self.process_index, self.num_processes = seed, process_index, num_processes
        self.position = start
        self._generator, self._epoch, self._order = torch.Generator().manual_seed(seed), -1, []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch < self._epoch:  # only forward in normal use; restart the draws otherwise
            self._generator, self._epoch = torch.Generator().manual_seed(self.seed), -1
        while self._epoch < epoch:
            # the draws of a shuffling DataLoader's epoch: a base seed for its workers, the order, and the
            # (empty) remainder its RandomSampler draws before it stops
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)
            self._order = torch.randperm(len(self.items), generator=self._generator).tolist()
            torch.randperm(len(self.items), generator=self._generator)
            self._epoch += 1
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        index = self.position * self.num_processes + self.process_index  # global batch index
        self.position += 1
        order = self._epoch_order(index // self.batches_per_epoch)
        start = (index % self.batches_per_epoch) * self.batch_size
        batch = self.collate_fn([self.items[i] for i in order[start : start + self.batch_size]])
        return {key: value.to(self.device) for key, value in batch.items()}
