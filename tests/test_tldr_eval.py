"""The paper's TL;DR win-rate protocol through `hypo eval`: the policy's summary against the dataset's reference
summary (a split of a dataset), the `tldr` prompt and its "Preferred: A/B" replies, the order randomized; the
judge is a local OpenAI-compatible server with a transparent rule (the shorter summary wins)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hypo.cli.main import main
from hypo.evaluation.llm_judge import TEMPLATES, TLDR_TEMPLATE, LLMJudge, parse_preferred


class ShorterSummaryServer:
    """Answers each TL;DR comparison like GPT-4 is asked to, preferring the shorter summary (A on a tie)."""

    def __init__(self):
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                a, b = re.search(r"Summary A:\n(.*)\n\nSummary B:\n(.*)\n\nFIRST", content, re.S).groups()
                verdict = "A" if len(a) <= len(b) else "B"
                server.requests.append({"content": content, "a": a, "b": b, "max_tokens": body["max_tokens"]})
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content":
                                    f"Comparison: Summary {verdict} is more concise.\nPreferred: {verdict}"}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply.encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def judge_server():
    server = ShorterSummaryServer()
    yield server
    server.httpd.shutdown()


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
    shown_first = [r["a"] for r in judge_server.requests]
    assert 0 < sum(a == "medium one" for a in shown_first) < len(items)  # both orders occur
    assert judge_server.requests[0]["content"].startswith(TLDR_TEMPLATE.split("{prompt}")[0])
    assert judge_server.requests[0]["max_tokens"] == 256 and judge.unparsed == 0


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
    assert all("Post:\nSUBREDDIT: r/reviews" in r["content"] for r in judge_server.requests)
