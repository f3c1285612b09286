"""Preference and prompt datasets: reading, validation, tokenization and batching.

Rows follow TRL's formats (extra keys are ignored):

* preference, standard: ``{"prompt": str, "chosen": str, "rejected": str}``
* preference, conversational: ``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen``
  and ``rejected`` are each a list holding exactly one ``{"role": "assistant", ...}`` message
* prompt-only: ``{"prompt": str}`` or ``{"prompt": [messages]}``

A source is a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a folder (written by
``datasets.save_to_disk`` or holding data files), or a Hugging Face Hub dataset name. Every problem
with a row raises :class:`DataError` whose message names the source, the 1-based row number and the
field, e.g. ``pairs.jsonl: row 7: field 'chosen': empty text``.

Tokenization mirrors what the policy sees and generates: the prompt is the raw text (tokenizer
special tokens such as BOS added) or the chat template applied with a generation prompt; a
completion is its text without special tokens followed by ``eos_token_id``. Prompts are truncated on
the left, completions on the right.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""File types read from disk; a missing path with one of these suffixes is 'file not found'."""
JSON_LIST_KEYS = ("data", "train", "rows")
"""Keys under which a ``.json`` object may hold its list of rows."""

_TYPE_HINT = "expected a string or a list of {role, content} messages"
_COMPLETION_HINT = "a conversational completion must be a list with one assistant message"
_RowEncoder = Callable[[Any, str], tuple[dict, int, int]]


class DataError(ValueError):
    """A source cannot be read or a row is malformed; the message names source, row and field."""


@dataclass
class LoadReport:
    """Counts from loading one dataset (truncation counts cover kept rows only)."""

    source: str
    rows_read: int
    rows_kept: int
    rows_skipped: int
    prompts_truncated: int
    completions_truncated: int


# --------------------------------------------------------------------------- reading


def read_rows(source: str, *, split: str = "train") -> list[dict]:
    """Read the raw rows of a file, folder or Hub dataset (see the module docstring).

    JSON and JSONL files are parsed here so that errors name the line; an invalid line raises
    ``DataError("<file>: row <line>: invalid JSON: ...")``.
    """
    rows, _ = _read_numbered(source, split, strict=True)
    return rows


def _read_numbered(source: str, split: str, *, strict: bool) -> tuple[list[Any], list[int]]:
    """Rows plus their 1-based row numbers (JSONL: line numbers).

    With ``strict=False`` an unreadable JSONL line becomes a :class:`DataError` instance in the row
    list, so the caller can skip it like any other bad row.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path, source, strict=strict)
        rows = _read_file(path, source)
    elif path.is_dir():
        rows = _read_folder(path, source, split)
    elif path.suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"{source}: file not found")
    elif source.startswith(("/", "./", "../", "~")):
        raise DataError(f"{source}: path not found")
    else:
        rows = _read_hub(source, split)
    return rows, list(range(1, len(rows) + 1))


def _read_jsonl(path: Path, source: str, *, strict: bool) -> tuple[list[Any], list[int]]:
    rows: list[Any] = []
    numbers: list[int] = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                row = DataError(f"{source}: row {number}: invalid JSON: {exc}")
            if not isinstance(row, dict | DataError):
                row = DataError(f"{source}: row {number}: expected a JSON object, got {_type_name(row)}")
            if strict and isinstance(row, DataError):
                raise row
            rows.append(row)
            numbers.append(number)
    return rows, numbers


def _read_file(path: Path, source: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path, source)
    if suffix in (".csv", ".parquet"):
        import datasets

        try:
            dataset = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as exc:
            raise DataError(f"{source}: cannot read {suffix[1:]} file: {exc}") from exc
        return dataset.to_list()
    raise DataError(
        f"{source}: unsupported file type {suffix!r} (expected one of {', '.join(FILE_SUFFIXES)})"
    )


def _read_json(path: Path, source: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: invalid JSON: {exc}") from None
    if isinstance(data, dict):
        key = next((k for k in JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{source}: expected a JSON list of objects or an object with a list under 'data', 'train' or 'rows'"
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of objects, got {_type_name(data)}")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {number}: expected a JSON object, got {_type_name(row)}")
    return data


def _read_folder(path: Path, source: str, split: str) -> list[dict]:
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{source}: split {split!r} not found (available: {', '.join(dataset)})")
            dataset = dataset[split]
        return dataset.to_list()
    try:
        dataset = datasets.load_dataset(str(path), split=split)
    except Exception as exc:
        raise DataError(f"{source}: cannot load dataset folder (split {split!r}): {exc}") from exc
    return dataset.to_list()


def _read_hub(source: str, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:
        raise DataError(f"{source}: cannot load Hugging Face Hub dataset (split {split!r}): {exc}") from exc
    return dataset.to_list()


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


def validate_prompt_row(row: Any, *, source: str = "<rows>", row_number: int = 1) -> bool:
    """Raise :class:`DataError` if ``row`` has no valid ``prompt``; return True if conversational."""
    where = f"{source}: row {row_number}"
    _check_row_object(row, where)
    return _check_prompt(row, where)


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
    _, chosen_text, rejected_text = _preference_texts(row, where)
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
    _check_row_object(row, where)
    _check_prompt(row, where)
    prompt_ids, prompt_cut = _keep_last(_encode_prompt(row["prompt"], tokenizer, where), max_prompt_length)
    return {"prompt_input_ids": prompt_ids, "prompt": row["prompt"]}, int(prompt_cut), 0


def _encode_rows(
    rows: Sequence[Any],
    encode: _RowEncoder,
    *,
    source: str,
    row_numbers: Sequence[int] | None,
    skip_bad_rows: bool,
) -> tuple[list[dict], LoadReport]:
    """Run ``encode`` over all rows, skipping or raising on bad ones, and build the report."""
    if not rows:
        raise DataError(f"{source}: no rows")
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(rows) + 1))
    if len(numbers) != len(rows):
        raise ValueError(f"row_numbers has {len(numbers)} entries for {len(rows)} rows")
    items: list[dict] = []
    errors: list[DataError] = []
    prompts_cut = completions_cut = 0
    for row, number in zip(rows, numbers, strict=True):
        try:
            item, prompt_cut, completion_cut = encode(row, f"{source}: row {number}")
        except DataError as exc:
            if not skip_bad_rows:
                raise
            errors.append(exc)
            continue
        item["index"] = len(items)
        items.append(item)
        prompts_cut += prompt_cut
        completions_cut += completion_cut
    if errors:
        logger.warning("%s: skipped %d of %d bad rows (first: %s)", source, len(errors), len(rows), errors[0])
    if not items:
        raise DataError(f"{source}: all {len(rows)} rows are bad (first: {errors[0]})")
    logger.info(
        "%s: %d rows kept, %d prompts and %d completions truncated",
        source,
        len(items),
        prompts_cut,
        completions_cut,
    )
    report = LoadReport(source, len(rows), len(items), len(errors), prompts_cut, completions_cut)
    return items, report


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
) -> tuple[list[dict], LoadReport]:
    """Validate and tokenize preference rows.

    Items: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of ints),
    ``prompt`` (the original field) and ``index`` (position in the returned list). Truncation: the
    prompt keeps its last ``max_prompt_length`` tokens, each completion its first
    ``max_completion_length``, then completions are cut to fit ``max_length`` after the prompt.
    ``row_numbers`` gives the 1-based numbers used in messages (default: position + 1).
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
    return _encode_rows(rows, encode, source=source, row_numbers=row_numbers, skip_bad_rows=skip_bad_rows)


def tokenize_prompt_rows(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str = "<rows>",
    max_prompt_length: int | None = None,
    skip_bad_rows: bool = False,
    row_numbers: Sequence[int] | None = None,
) -> tuple[list[dict], LoadReport]:
    """Validate and tokenize prompt-only rows (other keys are ignored).

    Items: ``prompt_input_ids``, ``prompt`` (the original field) and ``index``. A prompt longer than
    ``max_prompt_length`` keeps its last tokens.
    """
    _check_limits(max_prompt_length=max_prompt_length)
    _check_tokenizer(rows, tokenizer, source, eos=False)
    encode = partial(_encode_prompt_row, tokenizer=tokenizer, max_prompt_length=max_prompt_length)
    return _encode_rows(rows, encode, source=source, row_numbers=row_numbers, skip_bad_rows=skip_bad_rows)


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
    rows, numbers = _read_numbered(source, split, strict=not skip_bad_rows)
    return tokenize_preference_rows(
        rows,
        tokenizer,
        source=source,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        skip_bad_rows=skip_bad_rows,
        row_numbers=numbers,
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
    rows, numbers = _read_numbered(source, split, strict=not skip_bad_rows)
    return tokenize_prompt_rows(
        rows,
        tokenizer,
        source=source,
        max_prompt_length=max_prompt_length,
        skip_bad_rows=skip_bad_rows,
        row_numbers=numbers,
    )


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
