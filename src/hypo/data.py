"""Preference and prompt datasets: validation, tokenization and batching.

Rows follow TRL's formats (extra keys are ignored):

* preference, standard: ``{"prompt": str, "chosen": str, "rejected": str}``
* preference, conversational: ``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen``
  and ``rejected`` are each a list holding exactly one ``{"role": "assistant", ...}`` message
* preference, implicit prompt (TRL's rule, :func:`explicit_prompt_row`): ``chosen`` and ``rejected`` are
  whole conversations (``HuggingFaceH4/ultrafeedback_binarized``: user turn + assistant turn, beside a
  ``prompt`` string) or strings with a shared beginning and no ``prompt``; the shared part is the prompt.
  A ``prompt`` string with one-message conversational completions becomes the user turn.
* prompt-only: ``{"prompt": str}`` or ``{"prompt": [messages]}`` (or a preference row: its explicit prompt)

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
completion is its text without special tokens followed by the token the policy stops with: ``eos_token_id``
after a plain-text prompt, the chat template's end-of-turn token after a conversation. Prompts are truncated on
the left, completions on the right. Rows are validated one by one, then tokenized together in batched
tokenizer calls, each distinct prompt once (:func:`token_ids`).
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
    "check_preference_source", "check_prompt_source", "explicit_prompt_row", "extract_prompt", "load_preference_data",
    "load_prompt_data", "pad_sequences", "prompts_from_preference_rows", "read_rows", "render_prompt", "token_ids",
    "tokenize_preference_rows", "tokenize_prompt_rows", "validate_preference_row",
]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_TYPE_HINT = "expected a string or a list of {role, content} messages"
_COMPLETION_HINT = "a conversational completion must be a list with one assistant message"
_EXTRACTED_HINT = " (what is left after the leading messages that chosen and rejected share, taken as the prompt)"
_TOKENIZE_CHUNK = 2048
"""Texts per call of the batched tokenizer: a bound on the memory of its intermediate encodings."""

Prompt = str | list[dict]
_Prepare = Callable[[Any, str], tuple]
"""(row, where) -> the validated fields of the row; raises DataError (or _IdenticalPair)."""
_Encode = Callable[[list[tuple], list[str]], list["tuple[dict, int, int] | DataError"]]
"""(prepared rows, their locations) -> per row (item without index, prompts cut, completions cut) or its error."""


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


# --------------------------------------------------------------------------- implicit prompts


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """Split the longest shared prefix off two completions: ``(prompt, chosen rest, rejected rest)``.

    TRL's rule (``trl.extract_prompt``), for message lists and strings alike: the prompt is the run of
    leading elements (messages or characters) the two share; a space just before the first difference
    stays with the completions (``"Q: hi A: yes"`` / ``"Q: hi A: no"`` -> ``"Q: hi A:"``, ``" yes"``,
    ``" no"``). When one is a prefix of the other, the shorter one keeps its last element. Unlike TRL, a
    difference at the very first element gives an empty prompt whatever the last character is.

    Example: ``[user, assistant_a]`` and ``[user, assistant_b]`` -> ``([user], [assistant_a], [assistant_b])``.
    """
    shared = min(len(chosen), len(rejected))
    idx = 0
    for idx in range(shared):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def explicit_prompt_row(row: dict) -> dict | None:
    """A preference row with its prompt made explicit, or None when it already is (or cannot be).

    * ``chosen`` and ``rejected`` are conversations and ``prompt`` is missing or a string (the shape of
      ``HuggingFaceH4/ultrafeedback_binarized``: the user turn repeated in both): the messages they
      share become the prompt (:func:`extract_prompt`), as TRL's ``maybe_extract_prompt`` does;
    * they share no leading message and ``prompt`` is a string: the string becomes the user turn
      (a plain-text prompt with conversational completions);
    * ``chosen`` and ``rejected`` are strings and there is no ``prompt``: their shared leading text
      (TRL's rule for strings, e.g. Anthropic HH's ``"\\n\\nHuman: ... \\n\\nAssistant:"``).

    Anything else is left to validation, with the errors of an explicit row.
    """
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if _is_conversation(chosen) and _is_conversation(rejected) and (prompt is None or isinstance(prompt, str)):
        shared, chosen, rejected = extract_prompt(chosen, rejected)
        if shared:
            return {**row, "prompt": shared, "chosen": chosen, "rejected": rejected}
        if isinstance(prompt, str):
            return {**row, "prompt": [{"role": "user", "content": prompt}]}
        return None
    if isinstance(chosen, str) and isinstance(rejected, str) and prompt is None:
        shared, chosen, rejected = extract_prompt(chosen, rejected)
        if shared.strip():
            return {**row, "prompt": shared, "chosen": chosen, "rejected": rejected}
    return None


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
        if "chosen" in row and "rejected" in row:
            raise DataError(f"{where}: field 'prompt': missing, and chosen and rejected share no leading text or "
                            "messages to take it from")
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


def _completion_text(row: dict, field: str, conversational: bool, where: str, extracted: bool = False) -> str:
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
            raise DataError(f"{where}: field '{field}': {_COMPLETION_HINT}" + (_EXTRACTED_HINT if extracted else ""))
        text = value[0]["content"]
    else:
        raise DataError(f"{where}: field '{field}': {_TYPE_HINT}, got {_type_name(value)}")
    if not text.strip():
        raise DataError(f"{where}: field '{field}': empty text")
    return text


def _preference_fields(row: Any, where: str) -> tuple[Prompt, str, str]:
    """The prompt (made explicit, see :func:`explicit_prompt_row`) and the chosen and rejected text."""
    _check_row_object(row, where)
    explicit = explicit_prompt_row(row)
    row = explicit or row
    conversational = _check_prompt(row, where)
    chosen = _completion_text(row, "chosen", conversational, where, explicit is not None)
    rejected = _completion_text(row, "rejected", conversational, where, explicit is not None)
    return row["prompt"], chosen, rejected


def validate_preference_row(row: Any, *, source: str = "<rows>", row_number: int = 1) -> bool:
    """Raise :class:`DataError` if ``row`` is not a valid preference row; return True if conversational."""
    return isinstance(_preference_fields(row, f"{source}: row {row_number}")[0], list)


class _IdenticalPair(Exception):
    """A valid pair whose chosen and rejected are the same text: it is dropped, not an error."""


def _prepare_pair(row: Any, where: str) -> tuple[Prompt, str, str]:
    """Prompt, chosen and rejected text of a valid preference row with a preference in it."""
    prompt, chosen, rejected = _preference_fields(row, where)
    if chosen.strip() == rejected.strip():
        raise _IdenticalPair(where)
    return prompt, chosen, rejected


def _prepare_prompt(row: Any, where: str) -> tuple[Prompt]:
    """The prompt of a prompt-only row, or the explicit prompt of a preference row in a prompt source."""
    _check_row_object(row, where)
    if not isinstance(row.get("prompt"), list):
        row = explicit_prompt_row(row) or row
    _check_prompt(row, where)
    return (row["prompt"],)


# --------------------------------------------------------------------------- tokenization


def render_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase) -> str:
    """Prompt text as the policy sees it: a string as is, messages through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so conversational prompts cannot be rendered")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(text, add_special_tokens=...)["input_ids"]`` for each text, in batched calls.

    A fast tokenizer's Rust backend encodes each chunk of texts on all cores without computing character
    offsets (``encode_batch_fast``); the preceding ordinary call on one text resets the backend's padding,
    truncation and special-token settings to the tokenizer's own, so the ids are those of the ordinary
    call (tested). Other tokenizers take batched ordinary calls.
    """
    texts = list(texts)
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    ids: list[list[int]] = []
    if fast is not None:
        tokenizer(texts[:1], add_special_tokens=add_special_tokens)  # the backend's settings, as an ordinary call
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        if fast is not None:
            ids += [encoding.ids for encoding in fast(chunk, add_special_tokens=add_special_tokens)]
        else:
            ids += [list(row) for row in tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"]]
    return ids


def _prompt_token_ids(prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each prompt, each distinct prompt encoded once (TL;DR has several pairs per post).

    Chat templates already contain their special tokens; raw text gets the tokenizer's own (e.g. BOS).
    """
    keys = [p if isinstance(p, str) else json.dumps(p, sort_keys=True, ensure_ascii=False) for p in prompts]
    unique: dict[str, int] = {}  # key -> position in distinct
    distinct: list[Prompt] = []
    for key, prompt in zip(keys, prompts, strict=True):
        if key not in unique:
            unique[key] = len(distinct)
            distinct.append(prompt)
    ids: list[list[int] | None] = [None] * len(distinct)
    for conversational in (False, True):
        group = [i for i, p in enumerate(distinct) if isinstance(p, list) == conversational]
        texts = [render_prompt(distinct[i], tokenizer) for i in group]
        for i, row_ids in zip(group, token_ids(tokenizer, texts, add_special_tokens=not conversational), strict=True):
            ids[i] = row_ids
    return [ids[unique[key]] for key in keys]


def _completion_token_ids(texts: Sequence[str], conversational: Sequence[bool],
                          tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """A completion is its text without special tokens, followed by the token the policy would stop with:
    EOS after a plain-text prompt, the chat template's end-of-turn token after a conversation
    (`hypo.sampling.end_of_turn_token_id`; for Llama 3, Gemma and ChatML models the token that ends an
    assistant turn)."""
    from hypo.sampling import end_of_turn_token_id

    end_of_turn = end_of_turn_token_id(tokenizer) if any(conversational) else None
    return [[*ids, end_of_turn if chat else tokenizer.eos_token_id]
            for ids, chat in zip(token_ids(tokenizer, texts, add_special_tokens=False), conversational, strict=True)]


def _keep_last(ids: list[int], limit: int | None) -> tuple[list[int], bool]:
    if limit is None or len(ids) <= limit:
        return ids, False
    return ids[-limit:], True


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _check_chat_template(prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    if any(isinstance(p, list) for p in prompts) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the data is conversational but the tokenizer has no chat template")


def _encode_pairs(
    prepared: list[tuple[Prompt, str, str]],
    wheres: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    max_length: int | None,
    max_prompt_length: int | None,
    max_completion_length: int | None,
) -> list[tuple[dict, int, int] | DataError]:
    """Tokenize validated pairs in batches -> per pair (item without index, prompt cut, completions cut)."""
    _check_chat_template([p for p, _, _ in prepared], tokenizer, source)
    prompt_ids = _prompt_token_ids([p for p, _, _ in prepared], tokenizer)
    conversational = [isinstance(p, list) for p, _, _ in prepared]
    chosen_ids = _completion_token_ids([c for _, c, _ in prepared], conversational, tokenizer)
    rejected_ids = _completion_token_ids([r for _, _, r in prepared], conversational, tokenizer)
    out: list[tuple[dict, int, int] | DataError] = []
    for (prompt, _, _), where, ids, *completions in zip(prepared, wheres, prompt_ids, chosen_ids, rejected_ids,
                                                         strict=True):
        if not ids:
            out.append(DataError(f"{where}: field 'prompt': no tokens"))
            continue
        ids, prompt_cut = _keep_last(ids, max_prompt_length)
        limit = max_completion_length
        if max_length is not None:
            room = max_length - len(ids)
            if room < 1:
                out.append(DataError(f"{where}: field 'prompt': {len(ids)} tokens leave no room for a completion "
                                     f"within max_length={max_length}"))
                continue
            limit = room if limit is None else min(limit, room)
        completions_cut = sum(limit is not None and len(c) > limit for c in completions)
        if limit is not None:
            completions = [c[:limit] for c in completions]
        item = {"prompt_input_ids": ids, "chosen_input_ids": completions[0], "rejected_input_ids": completions[1],
                "prompt": prompt}
        out.append((item, int(prompt_cut), completions_cut))
    return out


def _encode_prompts(
    prepared: list[tuple[Prompt]], wheres: list[str], *, tokenizer: PreTrainedTokenizerBase, source: str,
    max_prompt_length: int | None,
) -> list[tuple[dict, int, int] | DataError]:
    """Tokenize validated prompts in batches -> per prompt (item without index, prompt cut, 0)."""
    prompts = [p for (p,) in prepared]
    _check_chat_template(prompts, tokenizer, source)
    out: list[tuple[dict, int, int] | DataError] = []
    for prompt, where, ids in zip(prompts, wheres, _prompt_token_ids(prompts, tokenizer), strict=True):
        if not ids:
            out.append(DataError(f"{where}: field 'prompt': no tokens"))
            continue
        ids, prompt_cut = _keep_last(ids, max_prompt_length)
        out.append(({"prompt_input_ids": ids, "prompt": prompt}, int(prompt_cut), 0))
    return out


def _format_name(conversational: bool) -> str:
    return "conversational (a message list)" if conversational else "plain text"


def _shorten(wheres: Sequence[str], source: str) -> str:
    return ", ".join(where.removeprefix(f"{source}: ") for where in wheres)


_warned: set[str] = set()


def _warn_once(message: str, *args) -> None:
    """A warning about a data file, once per process: the pre-flight check and the tokenizing load read the
    same rows and would say the same thing twice."""
    text = message % args
    if text not in _warned:
        _warned.add(text)
        logger.warning(text)


def _outcomes(rows: Sequence[Any], wheres: Sequence[str], prepare: _Prepare, encode: _Encode | None,
              skip_bad_rows: bool) -> list[Any]:
    """Per row, in order: (item, prompt cut, completions cut), a DataError or an _IdenticalPair.

    Rows are validated one by one, then the valid ones tokenized together (``encode``; None: no
    tokenizer, the item is the prompt). Without ``skip_bad_rows`` the rows after the first invalid one
    are neither validated nor tokenized: the error of that row, or of an earlier one, ends the load.
    """
    outcomes: list[Any] = []
    for row, where in zip(rows, wheres, strict=True):
        try:
            outcomes.append(prepare(row, where))
        except _IdenticalPair as exc:
            outcomes.append(exc)
        except DataError as exc:
            outcomes.append(exc)
            if not skip_bad_rows:
                break
    good = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, tuple)]
    if encode is None:
        encoded = [({"prompt": outcomes[i][0]}, 0, 0) for i in good]
    else:
        encoded = encode([outcomes[i] for i in good], [wheres[i] for i in good]) if good else []
    for i, result in zip(good, encoded, strict=True):
        outcomes[i] = result
    return outcomes


def _encode_rows(
    rows: Sequence[Any],
    prepare: _Prepare,
    encode: _Encode | None,
    *,
    source: str,
    wheres: Sequence[str],
    skip_bad_rows: bool,
) -> tuple[list[dict], LoadReport]:
    """Validate and (``encode`` given) tokenize all rows, skipping or raising on bad ones, and build the report.

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
    for outcome, where in zip(_outcomes(rows, wheres, prepare, encode, skip_bad_rows), wheres, strict=False):
        if isinstance(outcome, _IdenticalPair):
            identical.append(where)
            continue
        if isinstance(outcome, DataError):
            if not skip_bad_rows:
                raise outcome
            errors.append(outcome)
            continue
        item, prompt_cut, completion_cut = outcome
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
        _warn_once("%s: skipped %d of %d bad rows (first: %s)", source, len(errors), len(rows), errors[0])
    if identical:
        _warn_once(
            "%s: dropped %d of %d pairs whose chosen and rejected are identical (no preference signal): %s%s",
            source, len(identical), len(rows), _shorten(identical[:5], source), ", ..." if len(identical) > 5 else "",
        )
    if not items:
        if not identical:
            raise DataError(f"{source}: all {len(rows)} rows are bad (first: {errors[0]})")
        raise DataError(f"{source}: no usable rows: {len(errors)} bad, {len(identical)} with identical chosen and "
                        f"rejected ({_shorten(identical[:5], source)})" + (f"; first bad: {errors[0]}" if errors else ""))
    if encode is not None:
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
    ``prompt`` (the prompt field, or the prompt made explicit by :func:`explicit_prompt_row`) and
    ``index`` (position in the returned list). Truncation: the prompt keeps its last
    ``max_prompt_length`` tokens, each completion its first ``max_completion_length``, then completions
    are cut to fit ``max_length`` after the prompt. ``row_numbers`` gives the 1-based numbers used in
    messages (default: position + 1); ``row_locations`` replaces ``"<source>: row <n>"`` whole (rows
    from several files). Pairs whose chosen and rejected are the same text are dropped with a warning
    (see :class:`LoadReport`); plain-text and conversational rows must not be mixed. The valid rows are
    tokenized together in batched tokenizer calls (:func:`token_ids`), each distinct prompt once.
    """
    _check_limits(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
    )
    if tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no eos_token_id, which completions end with")
    encode = partial(
        _encode_pairs,
        tokenizer=tokenizer,
        source=source,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
    )
    wheres = _wheres(source, len(rows), row_numbers, row_locations)
    return _encode_rows(rows, _prepare_pair, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)


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
    ``max_prompt_length`` keeps its last tokens. A preference row whose prompt is implicit gives its
    explicit prompt (:func:`explicit_prompt_row`), so one source can feed both the pairs and the
    unlabeled prompts. ``row_numbers`` and ``row_locations``: as in :func:`tokenize_preference_rows`.
    """
    _check_limits(max_prompt_length=max_prompt_length)
    encode = partial(_encode_prompts, tokenizer=tokenizer, source=source, max_prompt_length=max_prompt_length)
    wheres = _wheres(source, len(rows), row_numbers, row_locations)
    return _encode_rows(rows, _prepare_prompt, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)


def load_preference_data(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "train",
    config_name: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[dict], LoadReport]:
    """Read ``source`` (``config_name``: its configuration, for Hub datasets and dataset folders) and
    tokenize it as preference pairs (see :func:`tokenize_preference_rows`)."""
    rows, wheres = read_located_rows(source, split=split, strict=False, config_name=config_name)
    return tokenize_preference_rows(  # bad rows raise in order here
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
    config_name: str | None = None,
    max_prompt_length: int | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[dict], LoadReport]:
    """Read ``source`` and tokenize its prompts (see :func:`tokenize_prompt_rows`)."""
    rows, wheres = read_located_rows(source, split=split, strict=False, config_name=config_name)
    return tokenize_prompt_rows(  # bad rows raise in order here
        rows,
        tokenizer,
        source=source,
        max_prompt_length=max_prompt_length,
        skip_bad_rows=skip_bad_rows,
        row_locations=wheres,
    )


def check_preference_source(source: str, *, split: str = "train", config_name: str | None = None,
                            skip_bad_rows: bool = False) -> LoadReport:
    """Read and validate every row of a preference source (every file of a folder) without a tokenizer
    or a model, so that a run can check all its data before loading anything heavy.

    The same rules and messages as :func:`load_preference_data` (which the tokenizer may still refuse
    for reasons of its own: a missing chat template, a prompt that leaves no room within
    ``max_length``); the report's truncation counts are 0. Raises :class:`DataError`.
    """
    rows, wheres = read_located_rows(source, split=split, strict=False, config_name=config_name)
    return _encode_rows(rows, _prepare_pair, None, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)[1]


def check_prompt_source(source: str, *, split: str = "train", config_name: str | None = None,
                        skip_bad_rows: bool = False) -> LoadReport:
    """Read and validate every row of a prompt-only source without a tokenizer or a model (see
    :func:`check_preference_source`); rules and messages as :func:`load_prompt_data`."""
    rows, wheres = read_located_rows(source, split=split, strict=False, config_name=config_name)
    return _encode_rows(rows, _prepare_prompt, None, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)[1]


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
    eval_pairs: list[dict] | None = None  # held-out pairs (config.eval_dataset) for eval_loss, eval_rewards/*


def load_training_data(config, tokenizer: PreTrainedTokenizerBase, *, with_prompts: bool) -> TrainingData:
    """Pairs, unlabeled prompts (`with_prompts`: the online term needs them), held-out prompts and held-out
    pairs of a `HyPOConfig`: the bundled task's unless the user gives them. Each source is read with its
    split and configuration (subset) name."""
    pairs_source, prompts_source, eval_source, judge = config.dataset, config.prompts, config.eval_prompts, config.judge
    if pairs_source is None:
        from hypo.tasks import get_task

        task = get_task(config.task)
        pairs_source, judge = str(task.pairs), judge or task.judge
        prompts_source = prompts_source or str(task.prompts)
        eval_source = eval_source or str(task.eval_prompts)
    lengths = {"max_prompt_length": config.max_prompt_length, "skip_bad_rows": config.skip_bad_rows}
    pair_lengths = {**lengths, "max_length": config.max_length, "max_completion_length": config.max_completion_length}
    pairs, _ = load_preference_data(pairs_source, tokenizer, split=config.dataset_split,
                                    config_name=config.dataset_config, **pair_lengths)
    prompts = None
    if with_prompts and prompts_source:
        prompts, _ = load_prompt_data(prompts_source, tokenizer, split=config.prompts_split,
                                      config_name=config.prompts_config, **lengths)
    elif with_prompts:
        prompts, _ = tokenize_prompt_rows(prompts_from_preference_rows(pairs), tokenizer, source=pairs_source,
                                          **lengths)
    eval_prompts = load_prompt_data(eval_source, tokenizer, split=config.eval_prompts_split,
                                    config_name=config.eval_prompts_config, **lengths)[0] if eval_source else None
    eval_pairs = None
    if config.eval_dataset and (config.eval_at_end or config.eval_steps):
        eval_pairs, _ = load_preference_data(config.eval_dataset, tokenizer, split=config.eval_dataset_split,
                                             config_name=config.eval_dataset_config, **pair_lengths)
        eval_pairs = eval_pairs[: config.eval_max_pairs] if config.eval_max_pairs else eval_pairs
    return TrainingData(pairs, prompts, eval_prompts, judge, eval_pairs)


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
