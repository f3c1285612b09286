"""Rows handed over in memory are sources like files: `run_sources` decides which roles they fill, and the check and
the tokenizing load walk them as a file's rows, with errors naming the dataset and the row."""

from __future__ import annotations

import datasets
import pytest

from hypo.config import HyPOConfig
from hypo.data.files import DataError
from hypo.data.sources import (
    InMemoryRows,
    check_run_sources,
    in_memory_fingerprints,
    in_memory_rows,
    load_training_data,
    run_sources,
)

PAIRS = [{"prompt": "Review the cafe.", "chosen": "Lovely coffee.", "rejected": "Cold coffee."},
         {"prompt": "Review the shoes.", "chosen": "Great fit.", "rejected": "They broke."}]


def test_rows_in_memory_take_their_roles_and_no_bundled_task():
    sources = run_sources(HyPOConfig(), InMemoryRows(pairs=PAIRS, eval_prompts=[{"prompt": "Review a hat."}]))
    assert sources.pairs.path == "train_dataset" and sources.pairs.rows == PAIRS
    assert sources.prompts is None and sources.prompts_from_pairs  # HyPO: the pairs' prompts
    assert sources.eval_prompts.path == "eval_prompts" and sources.judge is None  # no bundled task's judge
    bundled = run_sources(HyPOConfig(), InMemoryRows(eval_prompts=[{"prompt": "Review a hat."}]))
    assert bundled.pairs.path.endswith("pairs.jsonl") and bundled.eval_prompts.rows is not None
    dpo = run_sources(HyPOConfig(method="dpo", eval_at_end=False), InMemoryRows(pairs=PAIRS, prompts=PAIRS))
    assert dpo.prompts is None and dpo.eval_prompts is None  # DPO samples nothing; nothing is evaluated


def test_check_and_load_walk_in_memory_rows_like_a_files(tiny_tokenizer):
    bad = [*PAIRS, {"prompt": "Review the hat.", "chosen": "Warm.", "rejected": 3}]
    sources = run_sources(HyPOConfig(method="dpo"), InMemoryRows(pairs=bad))
    with pytest.raises(DataError, match=r"^train_dataset: row 3 \(index 2\): field 'rejected': expected a string"):
        check_run_sources(sources, skip_bad_rows=False)
    reports = check_run_sources(sources, skip_bad_rows=True)
    assert (reports["pairs"].rows_kept, reports["pairs"].rows_skipped) == (2, 1)
    config = HyPOConfig(method="hypo", eval_at_end=False, max_length=32, max_prompt_length=16)
    data = load_training_data(config, tiny_tokenizer, InMemoryRows(pairs=PAIRS))
    assert [item["prompt"] for item in data.pairs] == [row["prompt"] for row in PAIRS]
    assert [item["prompt"] for item in data.prompts] == ["Review the cafe.", "Review the shoes."]
    assert data.pairs[0]["prompt_input_ids"] == tiny_tokenizer("Review the cafe.")["input_ids"]


def test_what_counts_as_rows_in_memory():
    assert in_memory_rows(datasets.Dataset.from_list(PAIRS), "train_dataset") == PAIRS
    assert in_memory_rows(tuple(PAIRS), "train_dataset") == PAIRS
    with pytest.raises(DataError, match="train_dataset: an IterableDataset"):
        in_memory_rows(datasets.Dataset.from_list(PAIRS).to_iterable_dataset(), "train_dataset")
    with pytest.raises(DataError, match="prompt_dataset: expected a datasets.Dataset, a list of dicts"):
        in_memory_rows({"prompt": "x"}, "prompt_dataset")
    prints = in_memory_fingerprints(InMemoryRows(pairs=PAIRS))
    assert list(prints) == ["train_dataset"] and prints["train_dataset"]["rows"] == 2
    assert prints != in_memory_fingerprints(InMemoryRows(pairs=PAIRS[::-1]))  # order matters (the data order does)
