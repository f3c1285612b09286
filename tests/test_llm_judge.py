"""The LLM judge against a real HTTP server on 127.0.0.1 whose "chat model" is the tiny Llama choosing
"A" or "B" by the logits of those two tokens: verdict mapping, seeded order, cache resume, retries,
unreachable endpoint, and the API key sent but never written."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import build_model, build_tokenizer
from hypo.evaluation.llm_judge import TEMPLATE, JudgeEndpointError, LLMJudge, parse_verdict


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


# --------------------------------------------------------------------------- redirects and timeouts


class RecordingServer:
    """A server on 127.0.0.1 (its own port: its own origin) that records every request's method, path and
    headers and answers from `routes`: path -> (status, extra headers, body); any other path is a 404."""

    def __init__(self):
        self.requests: list[dict] = []
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.delay = 0.0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.requests.append({"method": self.command, "path": self.path, "body": body,
                                        "authorization": self.headers.get("Authorization")})
                if server.delay:
                    time.sleep(server.delay)
                status, headers, reply = server.routes.get(self.path, (404, {}, b"no such path"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = _answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


COMPLETION = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A"}}]}).encode()


@pytest.fixture()
def servers():
    """Two origins: `a` (the endpoint the judge is given) and `b` (another port, so another origin)."""
    a, b = RecordingServer(), RecordingServer()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_refused_and_sends_nothing_there(servers, monkeypatch, code):
    a, b = servers
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret")
    a.routes["/v1/chat/completions"] = (code, {"Location": f"{b.origin}/v1/chat/completions"}, b"")
    b.routes["/v1/chat/completions"] = (200, {"Content-Type": "application/json"}, COMPLETION)
    judge = LLMJudge(a.origin + "/v1", "tiny", api_key_env="MY_JUDGE_KEY", backoff_seconds=0.001)
    with pytest.raises(JudgeEndpointError) as info:
        judge.compare(*ITEMS[0])
    message = str(info.value)
    assert f"{a.origin}/v1/chat/completions redirected (HTTP {code}) to {b.origin}/v1/chat/completions" in message
    assert "another origin" in message
    assert b.requests == []  # neither the key nor the prompt went to the other origin
    assert [r["authorization"] for r in a.requests] == ["Bearer sk-test-secret"]  # and no retries


def test_redirect_to_another_scheme_on_the_same_host_is_another_origin(servers):
    a, _ = servers
    target = a.origin.replace("http://", "https://") + "/v1/chat/completions"
    a.routes["/v1/chat/completions"] = (301, {"Location": target}, b"")
    with pytest.raises(JudgeEndpointError, match="another origin"):
        LLMJudge(a.origin + "/v1", "tiny").compare(*ITEMS[0])


@pytest.mark.parametrize("code", [301, 307, 308])
def test_same_origin_redirect_is_followed_with_the_same_post(servers, monkeypatch, code):
    a, _ = servers
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret")
    a.routes["/v1/chat/completions"] = (code, {"Location": "/v2/chat/completions"}, b"")
    a.routes["/v2/chat/completions"] = (200, {"Content-Type": "application/json"}, COMPLETION)
    judge = LLMJudge(a.origin + "/v1", "tiny", api_key_env="MY_JUDGE_KEY")
    assert judge.compare(*ITEMS[0]) in (0.0, 1.0)
    first, second = a.requests
    assert (second["method"], second["path"]) == ("POST", "/v2/chat/completions")
    assert second["body"] == first["body"] and json.loads(second["body"])["model"] == "tiny"
    assert second["authorization"] == "Bearer sk-test-secret"  # same origin: the key may go along


def test_errors_name_the_url_that_failed_after_a_redirect(servers):
    a, _ = servers
    a.routes["/v1/chat/completions"] = (307, {"Location": f"{a.origin}/v2/chat/completions"}, b"")
    judge = LLMJudge(a.origin + "/v1", "tiny")
    with pytest.raises(JudgeEndpointError, match=rf"{a.origin}/v2/chat/completions answered HTTP 404"):
        judge.compare(*ITEMS[0])
    a.routes["/v2/chat/completions"] = (200, {}, b"<html>login</html>")
    with pytest.raises(JudgeEndpointError, match=rf"{a.origin}/v2/chat/completions sent no chat completion"):
        judge.compare(*ITEMS[0])
    a.routes["/v2/chat/completions"] = (503, {}, b"busy")
    judge = LLMJudge(a.origin + "/v1", "tiny", max_retries=1, backoff_seconds=0.001)
    with pytest.raises(JudgeEndpointError,
                       match=rf"{a.origin}/v2/chat/completions is unreachable after 2 attempts.*HTTP 503"):
        judge.compare(*ITEMS[0])


def test_redirect_loops_and_redirects_without_location_stop(servers):
    a, _ = servers
    a.routes["/v1/chat/completions"] = (302, {"Location": "/v1/chat/completions"}, b"")
    with pytest.raises(JudgeEndpointError, match="more than 5 redirects"):
        LLMJudge(a.origin + "/v1", "tiny").compare(*ITEMS[0])
    assert len(a.requests) == 6
    a.routes["/v1/chat/completions"] = (308, {}, b"")
    with pytest.raises(JudgeEndpointError, match="answered HTTP 308 without a Location"):
        LLMJudge(a.origin + "/v1", "tiny").compare(*ITEMS[0])


def test_request_timeout_is_a_parameter(servers):
    a, _ = servers
    a.routes["/v1/chat/completions"] = (200, {}, COMPLETION)
    a.delay = 2.0
    judge = LLMJudge(a.origin + "/v1", "tiny", timeout=0.2, max_retries=1, backoff_seconds=0.001)
    assert judge.timeout == 0.2
    with pytest.raises(JudgeEndpointError, match=r"unreachable after 2 attempts \(last error: .*timed out"):
        judge.compare(*ITEMS[0])
    assert LLMJudge(a.origin, "tiny").timeout == 60.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"timeout": 0}, "timeout must be a positive number"),
    ({"timeout": float("inf")}, "timeout must be a positive number"),
    ({"max_retries": -1}, "max_retries must be >= 0"),
    ({"base_url": "localhost:8000/v1"}, "base URL must be http"),
    ({"base_url": "ftp://example.com/v1"}, "base URL must be http"),
])
def test_bad_settings_are_value_errors(kwargs, message):
    settings = {"base_url": "http://127.0.0.1:1/v1", "model": "tiny", **kwargs}
    with pytest.raises(ValueError, match=message):
        LLMJudge(**settings)
