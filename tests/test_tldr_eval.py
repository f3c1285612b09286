"""The paper's TL;DR win-rate protocol through `hypo eval`: the policy's summary against the dataset's reference
summary (a split of a dataset), the `tldr` prompt and its "Preferred: A/B" replies, the order randomized; the
judge is a local OpenAI-compatible server with a transparent rule (the shorter summary wins)."""

from __future__ import annotations

import json
import re

import pytest
from judge_servers import StandInServer, chat

from hypo.cli.main import main
from hypo.evaluation.llm_judge import TEMPLATES, TLDR_CORRECTION, TLDR_TEMPLATE, LLMJudge, parse_preferred


def shorter_summary_wins(messages: list[dict]) -> str:
    """Answers a TL;DR comparison like GPT-4 is asked to, preferring the shorter summary (A on a tie)."""
    a, b = re.search(r"Summary A:\n(.*)\n\nSummary B:\n(.*)\n\nFIRST", messages[0]["content"], re.S).groups()
    verdict = "A" if len(a) <= len(b) else "B"
    return f"Comparison: Summary {verdict} is more concise.\nPreferred: {verdict}"


@pytest.fixture
def judge_server():
    server = StandInServer(chat(shorter_summary_wins))
    yield server
    server.close()


def _summaries(server) -> list[tuple[str, str]]:
    """(summary A, summary B) of each request, as shown to the judge."""
    return [re.search(r"Summary A:\n(.*)\n\nSummary B:\n(.*)\n\nFIRST", content, re.S).groups()
            for content in server.contents()]


@pytest.mark.parametrize(("reply", "verdict"), [
    ("Comparison: A covers the key point.\nPreferred: A", "A"),
    ("Comparison: Summary A rambles; I prefer B.\nPreferred: B", "B"),
    ('**Comparison:** B is vague.\n**Preferred:** "A"', "A"),
    ("Preferred: <\"B\">", "B"),
    ("B", "B"),
    ("Comparison: both are fine.", None),
])
def test_parse_preferred(reply, verdict):
    assert parse_preferred(reply) == verdict


def test_tldr_template_maps_verdicts_back_through_the_random_order(judge_server):
    judge = LLMJudge(judge_server.base_url, "gpt-4", template=TEMPLATES["tldr"], seed=3)
    items = [(f"POST: story {i}. TL;DR:", "short" if i % 2 else "a much longer summary", "medium one")
             for i in range(12)]
    wins = [judge.compare(post, policy, reference) for post, policy, reference in items]
    assert wins == [1.0 if len(policy) <= len(reference) else 0.0 for _, policy, reference in items]
    shown_first = [a for a, _ in _summaries(judge_server)]
    assert 0 < sum(a == "medium one" for a in shown_first) < len(items)  # both orders occur
    assert judge_server.contents()[0].startswith(TLDR_TEMPLATE.split("{prompt}")[0])
    assert judge_server.requests[0]["json"]["max_tokens"] == 256 and judge.unreadable_replies == 0


def test_tldr_replies_without_a_preferred_line_are_asked_again_then_invalid():
    """The `tldr` parser is held to the same rule: a reply with no verdict is answered with the format it must
    follow; one that never gives a verdict is invalid, not a tie."""
    replies = iter(["Comparison: both summaries are fine.", "Preferred: B",  # item 1: read on the second try
                    "Both are fine.", "I like both.", "No preference."])  # item 2: never readable
    server = StandInServer(chat(lambda messages: next(replies)))
    try:
        judge = LLMJudge(server.base_url, "gpt-4", template=TEMPLATES["tldr"], parse_retries=2)
        first, second = judge.judge_all([("POST: a. TL;DR:", "x", "y"), ("POST: b. TL;DR:", "z", "w")])
    finally:
        server.close()
    assert first.win == (1.0 if judge.swapped("POST: a. TL;DR:", "x", "y") else 0.0)  # B, mapped back
    assert second.win is None and second.reply == "No preference."
    assert server.requests[1]["json"]["messages"][1:] == [
        {"role": "assistant", "content": "Comparison: both summaries are fine."},
        {"role": "user", "content": TLDR_CORRECTION}]
    assert judge.unreadable_replies == 1 + 3 and judge.invalid == 1


def test_hypo_eval_tldr_win_rate_against_reference_summaries(tiny_model_dir, tmp_path, judge_server):
    import datasets

    rows = [{"prompt": f"SUBREDDIT: r/reviews\n\nTITLE: item {i}\n\nPOST: Write a short review of item {i}.\n\nTL;DR:",
             "completion": " " + "Great. " * (i + 1)} for i in range(4)]
    folder = tmp_path / "tldr"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--baseline_dataset",
            str(folder), "--baseline_split", "test", "--baseline_field", "completion", "--judge", "llm",
            "--judge_template", "tldr", "--judge_base_url", judge_server.base_url, "--judge_model", "gpt-4",
            "--num_samples", "1", "--max_new_tokens", "4", "--output_dir", str(out)]
    assert main(argv) == 0
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["reference_text"] for s in samples] == [r["completion"] for r in rows]  # the test split's summaries
    assert [s["win"] for s in samples] == [1.0 if len(s["policy_text"]) <= len(s["reference_text"]) else 0.0
                                           for s in samples]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["settings"]["judge_template"] == "tldr" and results["metrics"]["num_prompts"] == 4
    assert all("Post:\nSUBREDDIT: r/reviews" in content for content in judge_server.contents())
