"""Tests for hypo.data: reading, validation, tokenization, truncation and collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from hypo.data import (
    DataError,
    LoadReport,
    PairCollator,
    PromptCollator,
    load_preference_data,
    load_prompt_data,
    prompts_from_preference_rows,
    read_rows,
    render_prompt,
    tokenize_preference_rows,
    tokenize_prompt_rows,
    validate_preference_row,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS = [
    "system",
    "user",
    "assistant",
    "hello",
    "world",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "bad",
    "good",
    "what",
    "is",
    "two",
    "plus",
    "four",
    "six",
    "the",
    "a",
    "cat",
    "sat",
    "on",
    "mat",
    "be",
    "brief",
    "one",
    "three",
    "five",
    "seven",
    "eight",
    "nine",
    "ten",
    "?",
    ".",
    ",",
]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PAD, BOS, EOS, IM_START, IM_END = (VOCAB[t] for t in SPECIALS[:5])
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids(text: str) -> list[int]:
    """Expected word-level ids of whitespace-separated words."""
    return [VOCAB[w] for w in text.split()]


def make_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    core.add_special_tokens(SPECIALS)
    core.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


PAIRS = [
    {"prompt": "what is two plus two ?", "chosen": "four", "rejected": "six", "extra": 1},
    {"prompt": "how are you ?", "chosen": "fine thanks", "rejected": "bad"},
]
CONV = [
    {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "hello world"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
]


# --------------------------------------------------------------------------- reading


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS, blank_after=1)
    assert read_rows(str(path)) == PAIRS


@pytest.mark.parametrize("wrap", [None, "data", "train", "rows"])
def test_read_json_list_or_wrapped(tmp_path, wrap):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS if wrap is None else {"meta": 1, wrap: PAIRS}))
    assert read_rows(str(path)) == PAIRS


def test_read_json_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"nothing": 1}')
    with pytest.raises(DataError, match=r"bad\.json: expected a JSON list"):
        read_rows(str(path))
    path.write_text('[{"prompt": "a"}, 3]')
    with pytest.raises(DataError, match=r"bad\.json: row 2: expected a JSON object, got int"):
        read_rows(str(path))
    path.write_text("[{")
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON"):
        read_rows(str(path))


def test_read_csv_and_parquet(tmp_path):
    import datasets

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in PAIRS]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("prompt,chosen,rejected\n" + "".join(",".join(r.values()) + "\n" for r in rows))
    assert read_rows(str(csv_path)) == rows
    parquet_path = tmp_path / "conv.parquet"
    datasets.Dataset.from_list(CONV).to_parquet(str(parquet_path))
    assert read_rows(str(parquet_path)) == CONV


def test_read_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    rows = [{**row, "extra": i} for i, row in enumerate(PAIRS)]  # arrow needs the same keys in every row
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert read_rows(str(tmp_path / "single")) == rows
    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(CONV)}
    )
    both.save_to_disk(str(tmp_path / "dict"))
    assert read_rows(str(tmp_path / "dict")) == rows[:1]
    assert read_rows(str(tmp_path / "dict"), split="test") == CONV
    with pytest.raises(DataError, match=r"split 'valid' not found \(available: train, test\)"):
        read_rows(str(tmp_path / "dict"), split="valid")


def test_read_folder_of_data_files(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [GOOD])
    write_jsonl(folder / "test.jsonl", [{**GOOD, "chosen": "fine"}])
    assert read_rows(str(folder)) == [GOOD]
    assert read_rows(str(folder), split="test") == [{**GOOD, "chosen": "fine"}]
    with pytest.raises(DataError, match=r"raw: cannot load dataset folder \(split 'valid'\)"):
        read_rows(str(folder), split="valid")


def test_read_missing_file(tmp_path):
    for name in ("nope.jsonl", "nope.parquet"):
        with pytest.raises(DataError, match=rf"{name}: file not found"):
            read_rows(str(tmp_path / name))


def test_invalid_json_line_names_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], '{"prompt": ', PAIRS[1]], blank_after=0)
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 3: invalid JSON: "):
        read_rows(str(path))
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 2: expected a JSON object, got list"):
        read_rows(str(path))


# --------------------------------------------------------------------------- validation

GOOD = {"prompt": "hello", "chosen": "good", "rejected": "bad"}
MSG = [{"role": "user", "content": "hello"}]
ANS = [{"role": "assistant", "content": "good"}]
BAD_ROWS = [
    ({"chosen": "good", "rejected": "bad"}, "prompt", "missing"),
    ({"prompt": "hello", "chosen": "good"}, "rejected", "missing"),
    ({**GOOD, "prompt": 3}, "prompt", "expected a string or a list of {role, content} messages, got int"),
    (
        {**GOOD, "chosen": {"text": "x"}},
        "chosen",
        "expected a string or a list of {role, content} messages, got dict",
    ),
    ({**GOOD, "chosen": "  "}, "chosen", "empty text"),
    ({**GOOD, "prompt": ""}, "prompt", "empty text"),
    ({**GOOD, "chosen": ANS}, "chosen", "mixed formats"),
    ({"prompt": MSG, "chosen": ANS, "rejected": "bad"}, "rejected", "mixed formats"),
    (
        {"prompt": MSG, "chosen": ANS + ANS, "rejected": ANS},
        "chosen",
        "a conversational completion must be a list with one assistant message",
    ),
    (
        {"prompt": MSG, "chosen": ANS, "rejected": MSG},
        "rejected",
        "a conversational completion must be a list with one assistant message",
    ),
    ({"prompt": [{"role": "user"}], "chosen": ANS, "rejected": ANS}, "prompt", "message 1:"),
]


@pytest.mark.parametrize(("bad", "field", "text"), BAD_ROWS)
def test_bad_row_message_names_file_row_field(tmp_path, tok, bad, field, text):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_preference_data(str(path), tok)
    message = str(info.value)
    assert message.startswith(f"{path}: row 2: field '{field}': ")
    assert text in message


def test_validate_preference_row_reports_format():
    assert validate_preference_row(GOOD) is False
    assert validate_preference_row({"prompt": MSG, "chosen": ANS, "rejected": ANS}) is True
    with pytest.raises(DataError, match=r"^x\.json: row 4: field 'rejected': missing$"):
        validate_preference_row({"prompt": "a", "chosen": "b"}, source="x.json", row_number=4)


def test_prompt_leaving_no_room(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "prompt": "a cat sat on the mat"}])
    with pytest.raises(
        DataError,
        match=r"pairs\.jsonl: row 2: field 'prompt': 5 tokens leave no room for a completion within max_length=5",
    ):
        load_preference_data(str(path), tok, max_length=5, max_prompt_length=5)


def test_skip_bad_rows_drops_exactly_bad_rows(tmp_path, tok, caplog):
    rows = [GOOD, {"prompt": "hello"}, "{broken", {**GOOD, "chosen": "fine"}, {**GOOD, "rejected": ""}, GOOD]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="hypo.data"):
        items, report = load_preference_data(str(path), tok, skip_bad_rows=True)
    assert report == LoadReport(
        str(path), rows_read=6, rows_kept=3, rows_skipped=3, prompts_truncated=0, completions_truncated=0
    )
    assert [item["chosen_input_ids"] for item in items] == [
        ids("good") + [EOS],
        ids("fine") + [EOS],
        ids("good") + [EOS],
    ]
    assert [item["index"] for item in items] == [0, 1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 of 6 bad rows" in warnings[0]
    assert "row 2: field 'chosen': missing" in warnings[0]


def test_all_bad_or_empty_is_an_error_even_when_skipping(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": 1}, {"chosen": "x"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl: all 2 rows are bad"):
        load_preference_data(str(path), tok, skip_bad_rows=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_prompt_data(str(empty), tok, skip_bad_rows=True)


# --------------------------------------------------------------------------- tokenization


def test_standard_tokenization_adds_bos_and_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    items, report = load_preference_data(str(path), tok)
    assert items[0] == {
        "prompt_input_ids": [BOS] + ids("what is two plus two ?"),
        "chosen_input_ids": ids("four") + [EOS],
        "rejected_input_ids": ids("six") + [EOS],
        "prompt": "what is two plus two ?",
        "index": 0,
    }
    assert items[1]["chosen_input_ids"] == ids("fine thanks") + [EOS]
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (2, 2, 0)


def test_truncation_rules(tok, caplog):
    row = {"prompt": "one two three four five", "chosen": "six seven eight nine", "rejected": "ten"}
    with caplog.at_level(logging.INFO, logger="hypo.data"):
        items, report = tokenize_preference_rows(
            [row, GOOD], tok, source="mem", max_prompt_length=3, max_completion_length=3
        )
    first = items[0]
    assert first["prompt_input_ids"] == ids("three four five")  # last tokens kept, BOS dropped
    assert first["chosen_input_ids"] == ids("six seven eight")  # start kept, EOS cut off
    assert first["rejected_input_ids"] == ids("ten") + [EOS]
    assert items[1]["prompt_input_ids"] == [BOS] + ids("hello")
    assert (report.prompts_truncated, report.completions_truncated) == (1, 1)
    assert any("1 prompts and 1 completions truncated" in r.getMessage() for r in caplog.records)

    items, report = tokenize_preference_rows([row], tok, max_length=5, max_prompt_length=3)
    assert items[0]["prompt_input_ids"] == ids("three four five")
    assert items[0]["chosen_input_ids"] == ids("six seven")  # 5 - 3 prompt tokens
    assert items[0]["rejected_input_ids"] == ids("ten") + [EOS]
    assert (report.prompts_truncated, report.completions_truncated) == (1, 1)

    items, report = tokenize_preference_rows([row], tok, max_length=9)
    assert items[0]["prompt_input_ids"] == [BOS] + ids("one two three four five")
    assert items[0]["chosen_input_ids"] == ids("six seven eight")
    assert (report.prompts_truncated, report.completions_truncated) == (0, 1)


def test_limits_must_be_positive(tok):
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        tokenize_preference_rows([GOOD], tok, max_length=0)


def test_conversational_uses_chat_template(tok):
    rendered = render_prompt(CONV[0]["prompt"], tok)
    assert rendered == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt("plain text", tok) == "plain text"
    items, _ = tokenize_preference_rows(CONV, tok)
    assert items[0]["prompt_input_ids"] == [
        IM_START,
        *ids("system be brief"),
        IM_END,
        IM_START,
        *ids("user hello"),
        IM_END,
        IM_START,
        *ids("assistant"),
    ]  # no BOS: the template carries its special tokens
    assert items[0]["chosen_input_ids"] == ids("hello world") + [EOS]
    assert items[0]["rejected_input_ids"] == ids("bad") + [EOS]
    assert items[0]["prompt"] == CONV[0]["prompt"]


def test_conversational_without_chat_template_names_source(tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", CONV)
    with pytest.raises(
        DataError, match=r"conv\.jsonl: the data is conversational but the tokenizer has no chat"
    ):
        load_preference_data(str(path), make_tokenizer(chat_template=None))


def test_prompt_data_string_and_messages(tmp_path, tok):
    rows = [{"prompt": "a cat sat on the mat", "id": 7}, {"prompt": MSG}, {"prompt": ""}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(DataError, match=r"prompts\.jsonl: row 3: field 'prompt': empty text"):
        load_prompt_data(str(path), tok)
    items, report = load_prompt_data(str(path), tok, max_prompt_length=4, skip_bad_rows=True)
    assert items == [
        {"prompt_input_ids": ids("sat on the mat"), "prompt": "a cat sat on the mat", "index": 0},
        {"prompt_input_ids": [*ids("hello"), IM_END, IM_START, *ids("assistant")], "prompt": MSG, "index": 1},
    ]
    assert report == LoadReport(str(path), 3, 2, 1, prompts_truncated=2, completions_truncated=0)
    items, _ = tokenize_prompt_rows(PAIRS, tok, source="mem")
    assert items[1]["prompt_input_ids"] == [BOS] + ids("how are you ?")


def test_prompts_from_preference_rows_dedups_in_order():
    rows = [
        {"prompt": "b", "chosen": "x", "rejected": "y"},
        {"prompt": MSG, "chosen": ANS, "rejected": ANS},
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": "z", "rejected": "w"},
        {"prompt": [{"content": "hello", "role": "user"}], "chosen": ANS, "rejected": ANS},
    ]
    assert prompts_from_preference_rows(rows) == [{"prompt": "b"}, {"prompt": MSG}, {"prompt": "a"}]


# --------------------------------------------------------------------------- collation


def test_pair_collator_pads_prompt_left_and_completions_right():
    items = [
        {
            "prompt_input_ids": [5, 6, 7],
            "chosen_input_ids": [8],
            "rejected_input_ids": [9, 10, 2],
            "index": 4,
        },
        {"prompt_input_ids": [5], "chosen_input_ids": [11, 12], "rejected_input_ids": [2], "index": 1},
    ]
    batch = PairCollator(pad_token_id=0)(items)
    expected = {
        "prompt_input_ids": [[5, 6, 7], [0, 0, 5]],
        "prompt_attention_mask": [[1, 1, 1], [0, 0, 1]],
        "chosen_input_ids": [[8, 0], [11, 12]],
        "chosen_attention_mask": [[1, 0], [1, 1]],
        "rejected_input_ids": [[9, 10, 2], [2, 0, 0]],
        "rejected_attention_mask": [[1, 1, 1], [1, 0, 0]],
        "index": [4, 1],
    }
    assert set(batch) == set(expected)
    for name, values in expected.items():
        assert batch[name].dtype == torch.long
        assert batch[name].tolist() == values, name


def test_prompt_collator(tok):
    items, _ = tokenize_prompt_rows([{"prompt": "hello world"}, {"prompt": "hello"}], tok)
    batch = PromptCollator(pad_token_id=tok.pad_token_id)(items)
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "index"}
    assert batch["prompt_input_ids"].tolist() == [[BOS, *ids("hello world")], [PAD, BOS, *ids("hello")]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="empty batch"):
        PromptCollator(0)([])
