"""The shapes real preference datasets come in: implicit prompts (TRL's rule) on rows shaped like
HuggingFaceH4/ultrafeedback_binarized and Anthropic HH, a plain prompt with conversational completions,
configuration (subset) names, and batched tokenization that gives the ids of one call per text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from hypo.data.encoding import (
    load_preference_data,
    load_prompt_data,
    render_prompt,
    token_ids,
    tokenize_preference_rows,
    tokenize_prompt_rows,
)
from hypo.data.files import DataError, read_rows
from hypo.data.rows import check_preference_source, explicit_prompt_row, extract_prompt


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def ultrafeedback_row(i: int, prompt: str, chosen: str, rejected: str) -> dict:
    """One row as HuggingFaceH4/ultrafeedback_binarized (train_prefs) stores it: the prompt as a string and
    chosen / rejected as whole conversations that start with the same user turn."""
    return {"prompt": prompt, "prompt_id": f"{i:064x}",
            "chosen": [user(prompt), assistant(chosen)], "rejected": [user(prompt), assistant(rejected)],
            "messages": [user(prompt), assistant(chosen)], "score_chosen": 8.0, "score_rejected": 5.0}


UF = [ultrafeedback_row(0, "Write a short review of the movie Northern Lights.", "A great and lovely film.",
                        "A boring, slow film."),
      ultrafeedback_row(1, "Write a short review of a small cafe by the river.", "The coffee was excellent.",
                        "Terrible coffee.")]
EXPLICIT = [{"prompt": [row["chosen"][0]], "chosen": [row["chosen"][1]], "rejected": [row["rejected"][1]]}
            for row in UF]


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(("chosen", "rejected"), [
    ([user("What color is the sky?"), assistant("It is blue.")], [user("What color is the sky?"), assistant("Green.")]),
    ([user("a"), assistant("b"), user("c"), assistant("d")], [user("a"), assistant("b"), user("c"), assistant("e")]),
    ("Q: hi A: yes", "Q: hi A: no"),
    ("\n\nHuman: hello\n\nAssistant: Hi there!", "\n\nHuman: hello\n\nAssistant: Go away."),
    ("same start, then x", "same start, then y"),
    ([user("a"), assistant("b")], [user("a"), assistant("b")]),  # identical: the last element stays a completion
    ([user("a"), assistant("b")], [user("a"), assistant("b"), user("c"), assistant("d")]),  # one a prefix of the other
])
def test_extract_prompt_is_trls_rule(chosen, rejected):
    trl = pytest.importorskip("trl")
    expected = trl.extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])


def test_extract_prompt_keeps_the_space_with_the_completion():
    assert extract_prompt("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", " yes", " no")
    # a difference at the first character: no prompt (TRL would look at the last character here)
    assert extract_prompt("yes ", "no ") == ("", "yes ", "no ")


def test_explicit_prompt_row_shapes():
    # ultrafeedback_binarized: the shared user turn becomes the prompt, other keys are kept
    row = explicit_prompt_row(UF[0])
    assert row["prompt"] == [UF[0]["chosen"][0]] and row["chosen"] == [UF[0]["chosen"][1]]
    assert row["rejected"] == [UF[0]["rejected"][1]] and row["prompt_id"] == UF[0]["prompt_id"]
    # no prompt key at all
    no_prompt = {"chosen": UF[0]["chosen"], "rejected": UF[0]["rejected"]}
    assert explicit_prompt_row(no_prompt)["prompt"] == [UF[0]["chosen"][0]]
    # a string prompt with one-message completions: the string becomes the user turn
    plain = {"prompt": "hello?", "chosen": [assistant("hi")], "rejected": [assistant("go away")]}
    assert explicit_prompt_row(plain) == {**plain, "prompt": [user("hello?")]}
    # strings without a prompt (Anthropic HH)
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: No."}
    assert explicit_prompt_row(hh) == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello!",
                                       "rejected": " No."}
    # already explicit, or nothing to take: unchanged
    assert explicit_prompt_row(EXPLICIT[0]) is None
    assert explicit_prompt_row({"prompt": "p", "chosen": "a", "rejected": "b"}) is None
    assert explicit_prompt_row({"chosen": "yes", "rejected": "no"}) is None


# --------------------------------------------------------------------------- loading


def test_ultrafeedback_rows_load_like_explicit_rows(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train_prefs.jsonl", UF)
    items, report = load_preference_data(str(path), tiny_tokenizer, max_length=128, max_prompt_length=64)
    expected, _ = tokenize_preference_rows(EXPLICIT, tiny_tokenizer, max_length=128, max_prompt_length=64)
    assert report.rows_kept == 2 and items == expected
    assert items[0]["prompt"] == [user(UF[0]["prompt"])]
    text = tiny_tokenizer.decode(items[0]["prompt_input_ids"])
    assert text == f"<|im_start|>user\n{UF[0]['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(items[0]["chosen_input_ids"]) == "A great and lovely film.<|im_end|>"
    # the same rows without their prompt key, and as a prompt source for the online term
    no_prompt = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in UF]
    assert tokenize_preference_rows(no_prompt, tiny_tokenizer, max_length=128, max_prompt_length=64)[0] == expected
    prompts, _ = load_prompt_data(str(path), tiny_tokenizer)
    assert [p["prompt"] for p in prompts] == [e["prompt"] for e in EXPLICIT]
    assert check_preference_source(str(path)).rows_kept == 2


def test_plain_prompt_with_conversational_completions(tiny_tokenizer):
    rows = [{"prompt": r["prompt"], "chosen": [r["chosen"][1]], "rejected": [r["rejected"][1]]} for r in UF]
    items, _ = tokenize_preference_rows(rows, tiny_tokenizer)
    assert items == tokenize_preference_rows(EXPLICIT, tiny_tokenizer)[0]


def test_implicit_string_prompt(tiny_tokenizer):
    rows = [{"chosen": "Write a short review of a hotel. Great!", "rejected": "Write a short review of a hotel. Bad."}]
    items, _ = tokenize_preference_rows(rows, tiny_tokenizer)
    assert items[0]["prompt"] == "Write a short review of a hotel."
    assert tiny_tokenizer.decode(items[0]["chosen_input_ids"]) == " Great!<|im_end|>"


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "chosen": [user("p"), assistant("a"), user("more"), assistant("b")],
      "rejected": [user("p"), assistant("c")]},
     "row 1: field 'chosen': a conversational completion must be a list with one assistant message (what is left "
     "after the leading messages that chosen and rejected share"),
    ({"chosen": "yes", "rejected": "no"},
     "row 1: field 'prompt': missing, and chosen and rejected share no leading text or messages to take it from"),
    ({"prompt": [user("p")], "chosen": [user("p"), assistant("a")], "rejected": [assistant("b")]},
     "row 1: field 'chosen': a conversational completion must be a list with one assistant message"),
    ({"prompt": "p", "chosen": [user("x"), assistant("a")], "rejected": [user("y"), assistant("b")]},
     "row 1: field 'chosen': a conversational completion must be a list with one assistant message"),
])
def test_other_shapes_keep_todays_row_errors(tiny_tokenizer, row, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tokenize_preference_rows([row], tiny_tokenizer, source="uf")


def test_errors_come_in_row_order_across_validation_and_tokenization(tiny_tokenizer):
    long_prompt = {"prompt": "Write a short review " * 20, "chosen": "good", "rejected": "bad"}
    bad = {"prompt": "p", "chosen": "", "rejected": "bad"}
    good = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError, match="row 2: field 'prompt': .* no room"):  # tokenization error first
        tokenize_preference_rows([good, long_prompt, bad], tiny_tokenizer, max_length=16)
    with pytest.raises(DataError, match="row 1: field 'chosen': empty text"):
        tokenize_preference_rows([bad, long_prompt], tiny_tokenizer, max_length=16)
    items, report = tokenize_preference_rows([bad, long_prompt, good], tiny_tokenizer, max_length=16,
                                             skip_bad_rows=True)
    assert report.rows_skipped == 2 and [i["index"] for i in items] == [0]


# --------------------------------------------------------------------------- batched tokenization


def test_token_ids_equal_one_call_per_text(tiny_tokenizer):
    texts = ["Write a short review.", "", "The coffee was excellent and the staff were friendly. " * 30, "é ✓"]
    for special in (True, False):
        expected = [tiny_tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
        tiny_tokenizer(["a", "a b c"], padding=True, truncation=True, max_length=2)  # leaves state in the backend
        assert token_ids(tiny_tokenizer, texts, add_special_tokens=special) == expected


def test_token_ids_without_a_fast_backend(tiny_tokenizer):
    class Plain:  # a tokenizer with only the ordinary call
        def __call__(self, texts, add_special_tokens):
            return tiny_tokenizer(texts, add_special_tokens=add_special_tokens)

    texts = ["Write a short review.", "Terrible shoes."]
    assert token_ids(Plain(), texts, add_special_tokens=True) == token_ids(tiny_tokenizer, texts,
                                                                           add_special_tokens=True)


def test_batched_items_equal_per_row_encoding(tiny_tokenizer):
    """Each item is what encoding its row alone gives (the rule of hypo before batching): prompt with the
    tokenizer's special tokens or the chat template, completion + EOS, truncation left / right."""
    rows = [{"prompt": "Write a short review of the movie Northern Lights.", "chosen": "Great film. " * 6,
             "rejected": "Bad."},
            {"prompt": "Write a short review of the movie Northern Lights.", "chosen": "Lovely.",
             "rejected": "Boring and slow. " * 9},
            {"prompt": "A cafe.", "chosen": "Excellent coffee.", "rejected": "Terrible."}]
    items, report = tokenize_preference_rows(rows, tiny_tokenizer, max_length=24, max_prompt_length=8,
                                             max_completion_length=12)
    prompts_cut = completions_cut = 0
    for row, item in zip(rows, items, strict=True):
        prompt = tiny_tokenizer(row["prompt"])["input_ids"]
        prompts_cut += len(prompt) > 8
        room = min(12, 24 - len(prompt[-8:]))
        assert item["prompt_input_ids"] == prompt[-8:]
        for side in ("chosen", "rejected"):
            completion = tiny_tokenizer(row[side], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
            completions_cut += len(completion) > room
            assert item[f"{side}_input_ids"] == completion[:room]
    assert items[0]["prompt_input_ids"] == items[1]["prompt_input_ids"]  # the shared prompt, encoded once
    assert (report.prompts_truncated, report.completions_truncated) == (prompts_cut, completions_cut)
    assert prompts_cut == 2 and completions_cut >= 2  # the test exercises both cuts


def test_conversational_prompt_rows(tiny_tokenizer):
    rows = [{"prompt": [user("Hello there")]}, {"prompt": UF[0]["prompt"], "chosen": UF[0]["chosen"],
                                                 "rejected": UF[0]["rejected"]}]
    items, _ = tokenize_prompt_rows(rows[1:], tiny_tokenizer)
    text = render_prompt([user(UF[0]["prompt"])], tiny_tokenizer)
    assert items[0]["prompt_input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- configurations (subsets)


def _dataset_with_configs(root: Path) -> Path:
    """A dataset folder that defines two configurations in its README, as Hub datasets do."""
    for name, prompt in (("short", "a short one"), ("long", "a long one")):
        (root / name).mkdir(parents=True)
        write_jsonl(root / name / "train.jsonl", [{"prompt": prompt, "chosen": "yes", "rejected": "no"}])
        write_jsonl(root / name / "test.jsonl", [{"prompt": f"{prompt}, held out", "chosen": "yes", "rejected": "no"}])
    configs = "".join(f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
                      f"  - split: test\n    path: {name}/test.jsonl\n" for name in ("short", "long"))
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# two configurations\n")
    return root


def test_dataset_folder_configurations(tmp_path, tiny_tokenizer):
    folder = str(_dataset_with_configs(tmp_path / "ds"))
    assert read_rows(folder, config_name="long")[0]["prompt"] == "a long one"
    assert read_rows(folder, config_name="short", split="test")[0]["prompt"] == "a short one, held out"
    items, _ = load_preference_data(folder, tiny_tokenizer, config_name="long", split="test")
    assert items[0]["prompt"] == "a long one, held out"
    assert check_preference_source(folder, config_name="short").rows_kept == 1
    with pytest.raises(DataError, match="configuration 'nope'"):
        read_rows(folder, config_name="nope")


def test_configuration_of_a_hub_dataset_is_passed_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(UF)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_rows("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", config_name="default")
    assert rows == UF and calls == [("HuggingFaceH4/ultrafeedback_binarized", "default", "train_prefs")]
    read_rows("trl-lib/tldr-preference", split="validation")
    assert calls[-1] == ("trl-lib/tldr-preference", None, "validation")


def test_configuration_of_a_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="applies to Hub datasets and dataset folders, not to a single file"):
        read_rows(str(path), config_name="default")


def test_escaped_bytes_that_are_not_utf8_are_still_found(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + '{"prompt": "p", "chosen": "a\\udc80", "rejected": "b"}\n')
    with pytest.raises(DataError, match="row 2: field 'chosen': not UTF-8 text"):
        read_rows(str(path))
