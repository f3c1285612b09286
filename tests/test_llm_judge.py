"""The LLM judge against a real HTTP server on 127.0.0.1 whose "chat model" is the tiny Llama choosing
"A" or "B" by the logits of those two tokens: verdict mapping, seeded order, cache resume, retries,
unreachable endpoint, and the API key sent but never written."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import build_model, build_tokenizer
from hypo.llm_judge import TEMPLATE, JudgeEndpointError, LLMJudge, parse_verdict


class ChatServer:
    """`POST /v1/chat/completions` answered by the tiny model; `fail_next` requests get HTTP 500 first."""

    def __init__(self):
        self.tokenizer = build_tokenizer()
        self.model = build_model(self.tokenizer, seed=1)
        self.choices = [self.tokenizer.convert_tokens_to_ids(t) for t in ("A", "B")]
        self.requests: list[dict] = []  # {"content", "verdict", "authorization"}
        self.fail_next = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, content: str) -> str:
        ids = self.tokenizer(content, return_tensors="pt").input_ids[:, -200:]
        with torch.no_grad():
            logits = self.model(ids).logits[0, -1, self.choices]  # (2,)
        return "AB"[int(logits.argmax())]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    fail = server.fail_next > 0
                    server.fail_next -= fail
                    if self.path != "/v1/chat/completions" or fail:
                        server.requests.append({"failed": True})
                        self.send_error(404 if not fail else 500)
                        return
                    content = body["messages"][-1]["content"]
                    verdict = server.answer(content)
                    server.requests.append({"content": content, "verdict": verdict,
                                            "authorization": self.headers.get("Authorization")})
                reply = json.dumps({"object": "chat.completion", "model": body["model"],
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict},
                                                 "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture(scope="module")
def running_chat_server():
    server = ChatServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture()
def chat_server(running_chat_server):
    """The module's server with its request log and failure count reset for each test."""
    running_chat_server.requests.clear()
    running_chat_server.fail_next = 0
    return running_chat_server


ITEMS = [(f"Write a short review of item {i}.", f"Great item number {i}, lovely.", f"Bad item {i}.")
         for i in range(12)]


def test_verdicts_map_back_to_the_original_order(chat_server, tmp_path):
    judge = LLMJudge(chat_server.base_url, "tiny", cache_path=tmp_path / "cache.jsonl", seed=3)
    wins = [judge.compare(*item) for item in ITEMS]
    assert len(chat_server.requests) == len(ITEMS) == judge.requests
    orders = []
    for (prompt, policy, baseline), win, request in zip(ITEMS, wins, chat_server.requests, strict=True):
        swapped = judge.swapped(prompt, policy, baseline)
        first, second = (baseline, policy) if swapped else (policy, baseline)
        assert request["content"] == TEMPLATE.format(prompt=prompt, answer_a=first, answer_b=second)
        shown_first_won = request["verdict"] == "A"
        assert win == (1.0 if shown_first_won != swapped else 0.0)
        orders.append(swapped)
    assert True in orders and False in orders  # both orders occur
    # the order is a seeded function of the item: a new judge with the same seed draws the same orders
    again = LLMJudge(chat_server.base_url, "tiny", seed=3)
    assert [again.swapped(*item) for item in ITEMS] == orders


def test_cache_resumes_without_new_requests(chat_server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    first = LLMJudge(chat_server.base_url, "tiny", cache_path=cache)
    half = [first.compare(*item) for item in ITEMS[:6]]  # "interrupted" after 6 items
    assert len(chat_server.requests) == 6
    with cache.open("a") as f:
        f.write('{"key": "torn')  # an interrupted write is ignored
    resumed = LLMJudge(chat_server.base_url, "tiny", cache_path=cache)
    full = [resumed.compare(*item) for item in ITEMS]
    assert full[:6] == half and len(chat_server.requests) == 12  # only the 6 new items were asked
    again = LLMJudge(chat_server.base_url, "tiny", cache_path=cache)
    assert [again.compare(*item) for item in ITEMS] == full
    assert len(chat_server.requests) == 12 and again.requests == 0  # zero HTTP requests the second time
    other_model = LLMJudge(chat_server.base_url, "other", cache_path=cache)
    other_model.compare(*ITEMS[0])
    assert len(chat_server.requests) == 13  # the model is part of the cache key


def test_retries_after_server_errors_then_succeeds(chat_server):
    chat_server.fail_next = 2
    judge = LLMJudge(chat_server.base_url, "tiny", backoff_seconds=0.01)
    assert judge.compare(*ITEMS[0]) in (0.0, 1.0)
    assert [("failed" in r) for r in chat_server.requests] == [True, True, False]
    assert judge.requests == 3


def test_server_errors_beyond_the_retry_budget_name_the_url(chat_server):
    chat_server.fail_next = 10
    judge = LLMJudge(chat_server.base_url, "tiny", max_retries=2, backoff_seconds=0.001)
    with pytest.raises(JudgeEndpointError, match=r"/v1/chat/completions is unreachable after 3 attempts.*HTTP 500"):
        judge.compare(*ITEMS[0])


def test_unreachable_endpoint_names_the_url():
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = LLMJudge(url, "tiny", max_retries=1, backoff_seconds=0.001, timeout=2)
    with pytest.raises(JudgeEndpointError, match=f"{url}/chat/completions is unreachable after 2 attempts"):
        judge.compare(*ITEMS[0])


def test_api_key_is_sent_from_the_named_variable(chat_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret")
    cache = tmp_path / "cache.jsonl"
    LLMJudge(chat_server.base_url, "tiny", api_key_env="MY_JUDGE_KEY", cache_path=cache).compare(*ITEMS[0])
    assert chat_server.requests[-1]["authorization"] == "Bearer sk-test-secret"
    assert "sk-test-secret" not in cache.read_text()
    monkeypatch.delenv("MY_JUDGE_KEY")
    LLMJudge(chat_server.base_url, "tiny", api_key_env="MY_JUDGE_KEY").compare(*ITEMS[1])
    assert chat_server.requests[-1]["authorization"] is None


@pytest.mark.parametrize(("reply", "verdict"), [("A", "A"), (" b.", "B"), ("**Response B**", "B"), ("Tie", "tie"),
                                                ("answer a", "A"), ("I think A is better", None), ("", None)])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict
