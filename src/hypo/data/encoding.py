"""Tokenizing validated rows: what the policy sees and generates.

The prompt is the raw text (tokenizer special tokens such as BOS added) or the chat template applied with a
generation prompt; a completion is its text without special tokens followed by the token the policy stops
with: ``eos_token_id`` after a plain-text prompt, the chat template's end-of-turn token after a conversation
(:func:`hypo.models.tokens.end_of_turn_token_id`). Prompts are truncated on the left, completions on the
right. Rows are validated one by one (:mod:`hypo.data.rows`), then tokenized together in batched tokenizer
calls, each distinct prompt once (:func:`token_ids`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from hypo.data.files import DataError, read_located_rows
from hypo.data.rows import LoadReport, Prompt, collect_rows, prepare_pair, prepare_prompt, where_each_row

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 2048
"""Texts per call of the batched tokenizer: a bound on the memory of its intermediate encodings."""



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
    (`hypo.models.tokens.end_of_turn_token_id`; for Llama 3, Gemma and ChatML models the token that ends an
    assistant turn)."""
    from hypo.models.tokens import end_of_turn_token_id

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
    wheres = where_each_row(source, len(rows), row_numbers, row_locations)
    return collect_rows(rows, prepare_pair, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)


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
    wheres = where_each_row(source, len(rows), row_numbers, row_locations)
    return collect_rows(rows, prepare_prompt, encode, source=source, wheres=wheres, skip_bad_rows=skip_bad_rows)


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


