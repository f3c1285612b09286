"""Tests for hypo.data: reading, validation, tokenization, truncation and collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from hypo.data.batches import PairCollator, PromptCollator
from hypo.data.encoding import (
    load_preference_data,
    load_prompt_data,
    render_prompt,
    tokenize_preference_rows,
    tokenize_prompt_rows,
)
from hypo.data.files import DataError, read_rows
from hypo.data.rows import LoadReport, prompts_from_preference_rows, validate_preference_row

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


def test_bad_rows_are_reported_once_by_the_check_and_the_load_together(tmp_path, tok, caplog):
    from hypo.data.rows import check_preference_source

    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "hello"}, GOOD])
    with caplog.at_level(logging.WARNING, logger="hypo.data"):
        check_preference_source(str(path), skip_bad_rows=True)  # the pre-flight check of `hypo train`
        load_preference_data(str(path), tok, skip_bad_rows=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 of 3 bad rows" in warnings[0]


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
    # a conversational completion ends as the template ends an assistant turn (<|im_end|>; EOS is </s>)
    assert items[0]["chosen_input_ids"] == ids("hello world") + [IM_END]
    assert items[0]["rejected_input_ids"] == ids("bad") + [IM_END]
    assert items[0]["prompt"] == CONV[0]["prompt"]
    plain, _ = tokenize_preference_rows(PAIRS, tok)
    assert plain[0]["chosen_input_ids"] == ids("four") + [EOS]  # after a plain-text prompt: EOS


def test_end_of_turn_token_comes_from_the_chat_template(tok):
    from types import SimpleNamespace

    from hypo.models.tokens import end_of_turn_token_id, stop_token_ids

    assert end_of_turn_token_id(tok) == IM_END  # ChatML here, while the tokenizer's EOS is </s>
    assert end_of_turn_token_id(make_tokenizer(chat_template=None)) == EOS
    bare = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} .{% endfor %}"  # no special token after
    assert end_of_turn_token_id(make_tokenizer(chat_template=bare)) == EOS
    # the policy stops where the offline completions end
    assert stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tok) == [EOS, IM_END]


def test_conversational_without_chat_template_names_source(tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", CONV)
    with pytest.raises(
        DataError, match=r"conv\.jsonl: the data is conversational but the tokenizer has no chat"
    ):
        load_preference_data(str(path), make_tokenizer(chat_template=None))


def test_prompt_data_string_and_messages(tmp_path, tok):
    rows = [{"prompt": "a cat sat on the mat", "id": 7}, {"prompt": "hello"}, {"prompt": ""}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(DataError, match=r"prompts\.jsonl: row 3: field 'prompt': empty text"):
        load_prompt_data(str(path), tok)
    items, report = load_prompt_data(str(path), tok, max_prompt_length=4, skip_bad_rows=True)
    assert items == [
        {"prompt_input_ids": ids("sat on the mat"), "prompt": "a cat sat on the mat", "index": 0},
        {"prompt_input_ids": [BOS, *ids("hello")], "prompt": "hello", "index": 1},
    ]
    assert report == LoadReport(str(path), 3, 2, 1, prompts_truncated=1, completions_truncated=0)
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"prompt": MSG}])
    items, report = load_prompt_data(str(conv), tok, max_prompt_length=4)
    assert items == [
        {"prompt_input_ids": [*ids("hello"), IM_END, IM_START, *ids("assistant")], "prompt": MSG, "index": 0},
    ]
    assert report.prompts_truncated == 1
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


# --------------------------------------------------------------------------- encodings, CSV, formats


def test_bytes_that_are_not_utf8_name_file_row_and_field(tmp_path, tok):
    good = json.dumps(GOOD).encode()
    bad = b'{"prompt": "hello", "chosen": "caf\xe9", "rejected": "bad"}'
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join([good, good, bad, good]) + b"\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 3: field 'chosen': not UTF-8 text \(byte 0xe9\)"):
        read_rows(str(path))
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 3: field 'chosen': not UTF-8"):
        load_preference_data(str(path), tok)
    items, report = load_preference_data(str(path), tok, skip_bad_rows=True)
    assert (len(items), report.rows_skipped) == (3, 1)
    path.write_bytes(good + b"\n" + b'{"prompt": "hello", \xff\xfe}\n')  # undecodable and not JSON either
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 2: not UTF-8 text \(byte 0xff\)"):
        read_rows(str(path))
    path.write_bytes(b'{"prompt": [{"role": "user", "content": "\xc3("}], "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 1: field 'prompt': not UTF-8 text \(byte 0xc3\)"):
        read_rows(str(path))


def test_json_and_csv_not_utf8_name_the_row(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(b'[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "\x93quoted\x94",'
                     b' "chosen": "b", "rejected": "c"}\n]')
    with pytest.raises(DataError, match=r"pairs\.json: row 2: field 'prompt': not UTF-8 text \(byte 0x93\)"):
        read_rows(str(path))
    path.write_bytes(b'{"note": "\xff", "data": [{"prompt": "a", "chosen": "b", "rejected": "c"}]}')
    with pytest.raises(DataError, match=r"pairs\.json: line 1: not UTF-8 text \(byte 0xff\)"):
        read_rows(str(path))
    path.write_bytes(b'[{"prompt": "a"},\n {"prompt": \xff}]')
    with pytest.raises(DataError, match=r"pairs\.json: line 2: not UTF-8 text"):
        read_rows(str(path))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\nhello,good,bad\nhello,caf\xe9,bad\n")
    with pytest.raises(DataError, match=r"pairs\.csv: row 3: field 'chosen': not UTF-8 text \(byte 0xe9\)"):
        read_rows(str(csv_path))


@pytest.mark.parametrize(("text", "message"), [
    ("prompt,chosen,rejected\nhello,good,bad\nhello,good,bad,extra\n",
     r"pairs\.csv: row 3: expected 3 fields \(prompt, chosen, rejected\), got 4"),
    ("prompt,chosen,rejected\nhello,good\nhello,good,bad\n",
     r"pairs\.csv: row 2: expected 3 fields \(prompt, chosen, rejected\), got 2"),
    ('prompt,chosen,rejected\nhello,good,bad\n"hello,good,bad\nhello,good,bad\n',
     r"pairs\.csv: row 3: invalid CSV \(read up to line 4\): .*a quote that is never closed"),
    ('prompt,chosen,rejected\nhello,"good"x,bad\n', r"pairs\.csv: row 2: invalid CSV"),
    ("prompt,chosen,prompt\nhello,good,bad\n", r"pairs\.csv: row 1: the header repeats the column\(s\) prompt"),
])
def test_broken_csv_names_file_and_row(tmp_path, tok, text, message):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_rows(str(path))
    with pytest.raises(DataError, match=message):
        load_preference_data(str(path), tok)


def test_csv_rows_are_lines_quoted_newlines_and_skipping(tmp_path, tok):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\n"what is\ntwo plus two ?",four,six\n\nhello,good,bad,x\nhello,,bad\n'
                    "hello,fine,bad\n")
    # rows are line numbers: line 2 (two lines long), line 5 ragged, line 6 empty chosen, line 7 good
    with pytest.raises(DataError, match=r"pairs\.csv: row 5: expected 3 fields"):
        read_rows(str(path))
    items, report = load_preference_data(str(path), tok, skip_bad_rows=True)
    assert [item["prompt"] for item in items] == ["what is\ntwo plus two ?", "hello"]
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (4, 2, 2)


def test_identical_chosen_and_rejected_are_dropped_with_a_warning(tmp_path, tok, caplog):
    same = {"prompt": "hello", "chosen": "good", "rejected": "good"}
    conv_same = {"prompt": MSG, "chosen": ANS, "rejected": [{"role": "assistant", "content": "good "}]}
    rows = [GOOD, same, {**GOOD, "chosen": "fine"}, same, {**same, "rejected": " good\n"}, GOOD]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="hypo.data"):
        items, report = load_preference_data(str(path), tok)
    assert [item["chosen_input_ids"] for item in items] == [ids("good") + [EOS], ids("fine") + [EOS],
                                                            ids("good") + [EOS]]
    assert (report.rows_read, report.rows_kept, report.rows_skipped, report.rows_identical) == (6, 3, 0, 3)
    assert report.identical_rows == [f"{path}: row {n}" for n in (2, 4, 5)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 3 of 6 pairs whose chosen and rejected are identical" in warnings[0]
    assert warnings[0].endswith("row 2, row 4, row 5")
    conv = write_jsonl(tmp_path / "conv.jsonl", [*CONV, conv_same])
    assert load_preference_data(str(conv), tok)[1].identical_rows == [f"{conv}: row 2"]
    only = write_jsonl(tmp_path / "only.jsonl", [same, same])
    with pytest.raises(DataError, match=r"only\.jsonl: no usable rows: 0 bad, 2 with identical chosen and rejected"):
        load_preference_data(str(only), tok, skip_bad_rows=True)


MIXED = [
    ("pairs", [GOOD, GOOD, {"prompt": MSG, "chosen": ANS, "rejected": [{"role": "assistant", "content": "bad"}]}],
     r"row 3: field 'prompt': conversational \(a message list\), but row 1 is plain text"),
    ("pairs", [CONV[0], GOOD], r"row 2: field 'prompt': plain text, but row 1 is conversational"),
    ("prompts", [{"prompt": MSG}, {"prompt": "hello"}], r"row 2: field 'prompt': plain text, but row 1 is"),
]


@pytest.mark.parametrize(("kind", "rows", "message"), MIXED)
@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_mixing_plain_and_conversational_rows_is_an_error(tmp_path, tok, kind, rows, message, skip_bad_rows):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    load = load_preference_data if kind == "pairs" else load_prompt_data
    with pytest.raises(DataError, match=rf"{kind}\.jsonl: {message}.*must not mix"):
        load(str(path), tok, skip_bad_rows=skip_bad_rows)


def test_a_skipped_bad_row_does_not_set_the_format(tmp_path, tok):
    path = write_jsonl(tmp_path / "conv.jsonl", [{"prompt": "hello", "chosen": "good"}, *CONV, *CONV])
    items, report = load_preference_data(str(path), tok, skip_bad_rows=True)
    assert (len(items), report.rows_skipped) == (2, 1)


# --------------------------------------------------------------------------- checks without a tokenizer


def test_check_sources_validate_every_row_without_a_tokenizer(tmp_path):
    from hypo.data.rows import check_preference_source, check_prompt_source

    rows = [GOOD] * 300 + [{"prompt": "hello", "chosen": "good", "rejected": "good"}, {**GOOD, "rejected": ""}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 302: field 'rejected': empty text"):
        check_preference_source(str(path))
    report = check_preference_source(str(path), skip_bad_rows=True)
    assert (report.rows_read, report.rows_kept, report.rows_skipped, report.rows_identical) == (302, 300, 1, 1)
    assert report.identical_rows == [f"{path}: row 301"]
    assert (report.prompts_truncated, report.completions_truncated) == (0, 0)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}, {"prompt": MSG}])
    with pytest.raises(DataError, match=r"prompts\.jsonl: row 2: field 'prompt': conversational"):
        check_prompt_source(str(prompts))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}, {"prompt": ["x"]}, "{bad"])
    with pytest.raises(DataError, match=r"prompts\.jsonl: row 2: field 'prompt': message 1"):
        check_prompt_source(str(prompts))
    report = check_prompt_source(str(prompts), skip_bad_rows=True)
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (3, 1, 2)
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        check_prompt_source(str(tmp_path / "nope.jsonl"))


def test_check_of_a_folder_reads_every_file_of_the_split_and_names_it(tmp_path):
    from hypo.data.rows import check_preference_source

    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "train-00000.jsonl", [GOOD, GOOD])
    second = folder / "train-00001.csv"
    second.write_text("prompt,chosen,rejected\nhello,good,bad\nhello,good\n")
    write_jsonl(folder / "test.jsonl", [{"prompt": 1}])  # another split: not read
    with pytest.raises(DataError, match=rf"^{second}: row 3: expected 3 fields"):
        check_preference_source(str(folder))
    report = check_preference_source(str(folder), skip_bad_rows=True)
    assert (report.source, report.rows_read, report.rows_kept, report.rows_skipped) == (str(folder), 4, 3, 1)
    with pytest.raises(DataError, match=rf"^{folder / 'test.jsonl'}: row 1: field 'prompt'"):
        check_preference_source(str(folder), split="test")
