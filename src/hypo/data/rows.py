"""Preference and prompt rows: their formats, validation, and the walk over a source's rows.

Rows follow TRL's formats (extra keys are ignored):

* preference, standard: ``{"prompt": str, "chosen": str, "rejected": str}``
* preference, conversational: ``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen``
  and ``rejected`` are each a list holding exactly one ``{"role": "assistant", ...}`` message
* preference, implicit prompt (TRL's rule, :func:`explicit_prompt_row`): ``chosen`` and ``rejected`` are
  whole conversations (``HuggingFaceH4/ultrafeedback_binarized``: user turn + assistant turn, beside a
  ``prompt`` string) or strings with a shared beginning and no ``prompt``; the shared part is the prompt.
  A ``prompt`` string with one-message conversational completions becomes the user turn.
* prompt-only: ``{"prompt": str}`` or ``{"prompt": [messages]}`` (or a preference row: its explicit prompt)

Sources are read by :mod:`hypo.data.files`. Every problem with a row raises :class:`DataError` whose message
names the file, the 1-based row number and the field, e.g. ``pairs.jsonl: row 7: field 'chosen': empty text``.

All rows of a source share one format: a plain-text row in conversational data (or the reverse) is an
error naming the first row that differs. Pairs whose chosen and rejected are the same text (up to
surrounding whitespace) carry no preference and would only add noise to the batch statistics: they are
dropped with a warning that counts them and names the first rows, and :class:`LoadReport` records them.
:func:`check_preference_source` and :func:`check_prompt_source` validate a whole source without a
tokenizer or a model, so a run can check all its data before it loads anything heavy; the tokenizing load
(:mod:`hypo.data.encoding`) walks the rows the same way (:func:`collect_rows`), with the same messages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypo.data.files import DataError, read_located_rows

logger = logging.getLogger(__name__)

_TYPE_HINT = "expected a string or a list of {role, content} messages"
_COMPLETION_HINT = "a conversational completion must be a list with one assistant message"
_EXTRACTED_HINT = " (what is left after the leading messages that chosen and rejected share, taken as the prompt)"

Prompt = str | list[dict]
Prepare = Callable[[Any, str], tuple]
"""(row, where) -> the validated fields of the row; raises DataError (or IdenticalPair)."""
Encode = Callable[[list[tuple], list[str]], list["tuple[dict, int, int] | DataError"]]
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


class IdenticalPair(Exception):
    """A valid pair whose chosen and rejected are the same text: it is dropped, not an error."""


def prepare_pair(row: Any, where: str) -> tuple[Prompt, str, str]:
    """Prompt, chosen and rejected text of a valid preference row with a preference in it."""
    prompt, chosen, rejected = _preference_fields(row, where)
    if chosen.strip() == rejected.strip():
        raise IdenticalPair(where)
    return prompt, chosen, rejected


def prepare_prompt(row: Any, where: str) -> tuple[Prompt]:
    """The prompt of a prompt-only row, or the explicit prompt of a preference row in a prompt source."""
    _check_row_object(row, where)
    if not isinstance(row.get("prompt"), list):
        row = explicit_prompt_row(row) or row
    _check_prompt(row, where)
    return (row["prompt"],)


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


def _outcomes(rows: Sequence[Any], wheres: Sequence[str], prepare: Prepare, encode: Encode | None,
              skip_bad_rows: bool) -> list[Any]:
    """Per row, in order: (item, prompt cut, completions cut), a DataError or an IdenticalPair.

    Rows are validated one by one, then the valid ones tokenized together (``encode``; None: no
    tokenizer, the item is the prompt). Without ``skip_bad_rows`` the rows after the first invalid one
    are neither validated nor tokenized: the error of that row, or of an earlier one, ends the load.
    """
    outcomes: list[Any] = []
    for row, where in zip(rows, wheres, strict=True):
        try:
            outcomes.append(prepare(row, where))
        except IdenticalPair as exc:
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


def collect_rows(
    rows: Sequence[Any],
    prepare: Prepare,
    encode: Encode | None,
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
        if isinstance(outcome, IdenticalPair):
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


def where_each_row(source: str, count: int, row_numbers: Sequence[int] | None,
            row_locations: Sequence[str] | None) -> list[str]:
    if row_locations is not None:
        return list(row_locations)
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, count + 1))
    return [f"{source}: row {number}" for number in numbers]


def check_preference_source(source: str, *, split: str = "train", config_name: str | None = None,
                            skip_bad_rows: bool = False) -> LoadReport:
    """Read and validate every row of a preference source (every file of a folder) without a tokenizer
    or a model, so that a run can check all its data before loading anything heavy.

    The same rules and messages as :func:`load_preference_data` (which the tokenizer may still refuse
    for reasons of its own: a missing chat template, a prompt that leaves no room within
    ``max_length``); the report's truncation counts are 0. Raises :class:`DataError`.
    """
    rows, wheres = read_located_rows(source, split=split, strict=False, config_name=config_name)
    return collect_rows(rows, prepare_pair, None, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)[1]


def check_prompt_source(source: str, *, split: str = "train", config_name: str | None = None,
                        skip_bad_rows: bool = False) -> LoadReport:
    """Read and validate every row of a prompt-only source without a tokenizer or a model (see
    :func:`check_preference_source`); rules and messages as :func:`load_prompt_data`."""
    rows, wheres = read_located_rows(source, split=split, strict=False, config_name=config_name)
    return collect_rows(rows, prepare_prompt, None, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)[1]


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


