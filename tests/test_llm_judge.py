"""The LLM judge on the `openai` client against stand-in servers on 127.0.0.1 (`judge_servers`): verdict mapping,
seeded order, cache resume, unreadable replies asked again then invalid (never a tie, never cached), concurrency
(same results and cache at any concurrency), retries, unreachable endpoints, the API key sent but never written,
and redirects never reaching another origin."""

from __future__ import annotations

import socket

import pytest
import torch
from judge_servers import StandInServer, chat, completion

from conftest import build_model, build_tokenizer
from hypo.evaluation.llm_judge import (
    CORRECTION,
    TEMPLATE,
    JudgeEndpointError,
    LLMJudge,
    VerdictCache,
    parse_verdict,
)


class TinyModelReplies:
    """The "chat model": the tiny Llama choosing "A" or "B" by the logits of those two tokens."""

    def __init__(self):
        self.tokenizer = build_tokenizer()
        self.model = build_model(self.tokenizer, seed=1)
        self.choices = [self.tokenizer.convert_tokens_to_ids(t) for t in ("A", "B")]

    def __call__(self, messages: list[dict]) -> str:
        ids = self.tokenizer(messages[-1]["content"], return_tensors="pt").input_ids[:, -200:]
        with torch.no_grad():
            logits = self.model(ids).logits[0, -1, self.choices]  # (2,)
        return "AB"[int(logits.argmax())]


class ChatServer(StandInServer):
    """`POST /v1/chat/completions` answered by the tiny model; `fail_next` requests get HTTP 500 first (with
    `retry-after-ms: 1`, which the client honours instead of its backoff)."""

    def __init__(self):
        self.replies = TinyModelReplies()
        self.fail_next = 0
        answer = chat(self.replies)

        def fail_first(request):
            if self.fail_next > 0:
                self.fail_next -= 1
                request["failed"] = True
                return 500, {"retry-after-ms": "1"}, b"overloaded"
            return answer(request)

        super().__init__(fail_first)

    def verdicts(self) -> list[str]:
        return [self.replies(r["json"]["messages"]) for r in self.requests if not r.get("failed")]


@pytest.fixture(scope="module")
def running_chat_server():
    server = ChatServer()
    yield server
    server.close()


@pytest.fixture()
def chat_server(running_chat_server):
    """The module's server with its request log and failure count reset for each test."""
    running_chat_server.requests.clear()
    running_chat_server.fail_next = 0
    running_chat_server.max_in_flight = 0
    return running_chat_server


ITEMS = [(f"Write a short review of item {i}.", f"Great item number {i}, lovely.", f"Bad item {i}.")
         for i in range(12)]


def test_verdicts_map_back_to_the_original_order(chat_server, tmp_path):
    judge = LLMJudge(chat_server.base_url, "tiny", cache_path=tmp_path / "cache.jsonl", seed=3)
    wins = [judge.compare(*item) for item in ITEMS]
    assert len(chat_server.requests) == len(ITEMS) == judge.requests
    orders = []
    for (prompt, policy, baseline), win, request, verdict in zip(ITEMS, wins, chat_server.requests,
                                                                  chat_server.verdicts(), strict=True):
        swapped = judge.swapped(prompt, policy, baseline)
        first, second = (baseline, policy) if swapped else (policy, baseline)
        body = request["json"]
        assert body["messages"] == [{"role": "user", "content": TEMPLATE.format(prompt=prompt, answer_a=first,
                                                                                answer_b=second)}]
        assert body["model"] == "tiny" and body["temperature"] == 0 and body["max_tokens"] == 8
        assert win == (1.0 if (verdict == "A") != swapped else 0.0)
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
    full = [j.win for j in resumed.judge_all(ITEMS)]
    assert full[:6] == half and len(chat_server.requests) == 12  # only the 6 new items were asked
    again = LLMJudge(chat_server.base_url, "tiny", cache_path=cache)
    assert [again.compare(*item) for item in ITEMS] == full
    assert len(chat_server.requests) == 12 and again.requests == 0  # zero HTTP requests the second time
    other_model = LLMJudge(chat_server.base_url, "other", cache_path=cache)
    other_model.compare(*ITEMS[0])
    assert len(chat_server.requests) == 13  # the model is part of the cache key


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_results_and_cache_are_the_same_at_any_concurrency(chat_server, tmp_path, concurrency):
    """12 items and 3 repeats of item 0: 12 requests whatever the concurrency, the same wins, the same cache
    bytes (verdicts appended in the items' order), and with concurrency > 1 requests really overlap."""
    items = ITEMS + [ITEMS[0]] * 3
    serial = LLMJudge(chat_server.base_url, "tiny", cache_path=tmp_path / "serial.jsonl", seed=5)
    expected = [serial.compare(*item) for item in items]
    chat_server.requests.clear()
    chat_server.delay, chat_server.max_in_flight = 0.05, 0
    try:
        judge = LLMJudge(chat_server.base_url, "tiny", cache_path=tmp_path / "c.jsonl", seed=5,
                         concurrency=concurrency)
        assert [j.win for j in judge.judge_all(items)] == expected
    finally:
        chat_server.delay = 0.0
    assert len(chat_server.requests) == len(ITEMS) == judge.requests  # a repeated item is asked once
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "serial.jsonl").read_bytes()
    assert (chat_server.max_in_flight > 1) == (concurrency > 1)


class EveryThirdUnreadable:
    """A judge that answers every third request "I cannot decide; both have merits." and otherwise "A"."""

    def __init__(self):
        self.count = 0

    def __call__(self, messages):
        self.count += 1
        return "I cannot decide; both have merits." if self.count % 3 == 0 else "A"


def test_unreadable_replies_are_asked_again_with_the_parse_failure_fed_back(tmp_path):
    server = StandInServer(chat(EveryThirdUnreadable()))
    try:
        judge = LLMJudge(server.base_url, "j", cache_path=tmp_path / "cache.jsonl", parse_retries=2)
        judgments = judge.judge_all(ITEMS[:8])
    finally:
        server.close()
    # requests 3, 6 and 9 were unreadable; each was asked again in the same conversation and then answered "A"
    assert len(server.requests) == 8 + 3 and judge.unreadable_replies == 3 and judge.invalid == 0
    assert all(j.win is not None for j in judgments)
    retry = server.requests[3]["json"]["messages"]
    assert retry[0] == server.requests[2]["json"]["messages"][0]  # the same item
    assert retry[1:] == [{"role": "assistant", "content": "I cannot decide; both have merits."},
                         {"role": "user", "content": CORRECTION}]
    assert len(VerdictCache(tmp_path / "cache.jsonl").verdicts) == 8


def test_judgments_whose_replies_stay_unreadable_are_invalid_not_ties_and_not_cached(tmp_path):
    replies = {"unreadable": True}
    server = StandInServer(chat(lambda messages: "I cannot decide; both have merits." if replies["unreadable"]
                                else "tie"))
    cache = tmp_path / "cache.jsonl"
    try:
        judge = LLMJudge(server.base_url, "j", cache_path=cache, parse_retries=1, concurrency=2)
        judgments = judge.judge_all(ITEMS[:3])
        assert [j.win for j in judgments] == [None] * 3  # neither win, loss nor tie
        assert [j.reply for j in judgments] == ["I cannot decide; both have merits."] * 3
        assert len(server.requests) == 3 * 2 and judge.unreadable_replies == 6 and judge.invalid == 3
        assert not cache.exists() or cache.read_text() == ""  # nothing cached: not a tie, not "invalid"
        replies["unreadable"] = False  # a rerun asks again
        rerun = LLMJudge(server.base_url, "j", cache_path=cache, parse_retries=1)
        assert [rerun.compare(*item) for item in ITEMS[:3]] == [0.5] * 3 and len(server.requests) == 9
    finally:
        server.close()
    assert set(VerdictCache(cache).verdicts.values()) == {"tie"}


def test_the_cache_reads_only_readable_verdicts_and_refuses_to_store_others(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "verdict": "A"}\n{"key": "b", "verdict": "invalid"}\n{"key": "c"}\n[1]\n')
    assert VerdictCache(path).verdicts == {"a": "A"}
    with pytest.raises(ValueError, match="only readable verdicts are cached"):
        VerdictCache(path).put("b", "invalid")


def test_a_failure_mid_batch_keeps_the_verdicts_already_received(tmp_path):
    def answer(request):
        content = request["json"]["messages"][-1]["content"]
        return (400, {}, b"bad item") if "item 5." in content else chat(lambda m: "B")(request)

    server = StandInServer(answer)
    cache = tmp_path / "cache.jsonl"
    try:
        judge = LLMJudge(server.base_url, "j", cache_path=cache, concurrency=1)
        with pytest.raises(JudgeEndpointError, match="answered HTTP 400: bad item"):
            judge.judge_all(ITEMS)
    finally:
        server.close()
    # every verdict paid for is kept: items 0-4, and item 6 when the worker had started it before the failure
    # reached the caller; the items not yet started were never sent
    answered = [r for r in server.requests if "item 5." not in r["json"]["messages"][-1]["content"]]
    assert len(VerdictCache(cache).verdicts) == len(answered) in (5, 6) and len(server.requests) <= 7


def test_retries_after_server_errors_then_succeeds(chat_server):
    chat_server.fail_next = 2
    judge = LLMJudge(chat_server.base_url, "tiny")
    assert judge.compare(*ITEMS[0]) in (0.0, 1.0)
    assert [("failed" in r) for r in chat_server.requests] == [True, True, False]
    assert judge.requests == 3


def test_server_errors_beyond_the_retry_budget_name_the_url(chat_server):
    chat_server.fail_next = 10
    judge = LLMJudge(chat_server.base_url, "tiny", max_retries=2)
    with pytest.raises(JudgeEndpointError, match=r"/v1/chat/completions is unreachable after 3 attempts.*HTTP 500"):
        judge.compare(*ITEMS[0])


def test_unreachable_endpoint_names_the_url():
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = LLMJudge(url, "tiny", max_retries=1, timeout=2)
    with pytest.raises(JudgeEndpointError, match=f"{url}/chat/completions is unreachable after 2 attempts"):
        judge.compare(*ITEMS[0])


def test_api_key_is_sent_from_the_named_variable_only(chat_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other-variable")  # never sent when another variable is named
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin")
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


class Routes:
    """An answer function from a table: path -> (status, headers, body); any other path is a 404."""

    def __init__(self):
        self.table: dict[str, tuple[int, dict, bytes]] = {}

    def __call__(self, request):
        return self.table.get(request["path"], (404, {}, b"no such path"))


@pytest.fixture()
def servers():
    """Two origins: `a` (the endpoint the judge is given) and `b` (another port, so another origin)."""
    a, b = StandInServer(Routes()), StandInServer(Routes())
    yield a, b
    a.close()
    b.close()


COMPLETION = (200, {"Content-Type": "application/json"}, completion("A"))


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_refused_and_sends_nothing_there(servers, monkeypatch, code):
    a, b = servers
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret")
    a.answer.table["/v1/chat/completions"] = (code, {"Location": f"{b.origin}/v1/chat/completions"}, b"")
    b.answer.table["/v1/chat/completions"] = COMPLETION
    judge = LLMJudge(a.base_url, "tiny", api_key_env="MY_JUDGE_KEY")
    with pytest.raises(JudgeEndpointError) as info:
        judge.compare(*ITEMS[0])
    message = str(info.value)
    assert f"{a.origin}/v1/chat/completions redirected (HTTP {code}) to {b.origin}/v1/chat/completions" in message
    assert "another origin" in message
    assert b.requests == []  # neither the key nor the prompt went to the other origin
    assert [r["authorization"] for r in a.requests] == ["Bearer sk-test-secret"]  # and no retries


def test_redirect_to_https_on_the_same_host_is_another_origin(servers, monkeypatch):
    """The `openai` client alone would follow this one with the key (httpx keeps it on an https upgrade)."""
    a, _ = servers
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret")
    target = a.origin.replace("http://", "https://") + "/v1/chat/completions"
    a.answer.table["/v1/chat/completions"] = (307, {"Location": target}, b"")
    with pytest.raises(JudgeEndpointError, match="another origin"):
        LLMJudge(a.base_url, "tiny", api_key_env="MY_JUDGE_KEY").compare(*ITEMS[0])
    assert len(a.requests) == 1


@pytest.mark.parametrize("code", [307, 308])
def test_same_origin_redirect_keeping_the_post_is_followed(servers, monkeypatch, code):
    a, _ = servers
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret")
    a.answer.table["/v1/chat/completions"] = (code, {"Location": "/v2/chat/completions"}, b"")
    a.answer.table["/v2/chat/completions"] = COMPLETION
    judge = LLMJudge(a.base_url, "tiny", api_key_env="MY_JUDGE_KEY")
    assert judge.compare(*ITEMS[0]) in (0.0, 1.0)
    first, second = a.requests
    assert (second["method"], second["path"]) == ("POST", "/v2/chat/completions")
    assert second["body"] == first["body"] and second["json"]["model"] == "tiny"
    assert second["authorization"] == "Bearer sk-test-secret"  # same origin: the key may go along


@pytest.mark.parametrize("code", [301, 302, 303])
def test_same_origin_redirect_that_would_make_a_get_is_refused(servers, code):
    a, _ = servers
    a.answer.table["/v1/chat/completions"] = (code, {"Location": "/v2/chat/completions"}, b"")
    a.answer.table["/v2/chat/completions"] = COMPLETION
    with pytest.raises(JudgeEndpointError, match=f"redirected \\(HTTP {code}\\) to {a.origin}/v2/chat/completions, "
                                                 "which would turn the POST into a GET"):
        LLMJudge(a.base_url, "tiny").compare(*ITEMS[0])
    assert len(a.requests) == 1


def test_errors_name_the_url_that_failed_after_a_redirect(servers):
    a, _ = servers
    a.answer.table["/v1/chat/completions"] = (307, {"Location": f"{a.origin}/v2/chat/completions"}, b"")
    judge = LLMJudge(a.base_url, "tiny")
    with pytest.raises(JudgeEndpointError, match=rf"{a.origin}/v2/chat/completions answered HTTP 404"):
        judge.compare(*ITEMS[0])
    a.answer.table["/v2/chat/completions"] = (503, {"retry-after-ms": "1"}, b"busy")
    judge = LLMJudge(a.base_url, "tiny", max_retries=1)
    with pytest.raises(JudgeEndpointError,
                       match=rf"{a.origin}/v2/chat/completions is unreachable after 4 attempts.*HTTP 503"):
        judge.compare(*ITEMS[0])  # 2 tries of 2 requests each (the redirect, then the 503)


def test_a_reply_that_is_no_chat_completion_is_an_endpoint_error(servers):
    a, _ = servers
    a.answer.table["/v1/chat/completions"] = (200, {"Content-Type": "text/html"}, b"<html>login</html>")
    with pytest.raises(JudgeEndpointError, match="sent no chat completion"):
        LLMJudge(a.base_url, "tiny").compare(*ITEMS[0])


def test_redirect_loops_stop(servers):
    a, _ = servers
    a.answer.table["/v1/chat/completions"] = (307, {"Location": "/v1/chat/completions"}, b"")
    with pytest.raises(JudgeEndpointError, match="more than 5 redirects"):
        LLMJudge(a.base_url, "tiny").compare(*ITEMS[0])
    assert len(a.requests) == 6  # no retries of a loop


def test_request_timeout_is_a_parameter(servers):
    a, _ = servers
    a.answer.table["/v1/chat/completions"] = COMPLETION
    a.delay = 2.0
    judge = LLMJudge(a.base_url, "tiny", timeout=0.2, max_retries=1)
    assert judge.timeout == 0.2
    with pytest.raises(JudgeEndpointError, match=r"unreachable after 2 attempts \(last error: .*Timeout"):
        judge.compare(*ITEMS[0])
    assert LLMJudge(a.origin, "tiny").timeout == 60.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"timeout": 0}, "timeout must be a positive number"),
    ({"timeout": float("inf")}, "timeout must be a positive number"),
    ({"max_retries": -1}, "max_retries must be an integer >= 0"),
    ({"concurrency": 0}, "concurrency must be an integer >= 1"),
    ({"parse_retries": -1}, "parse_retries must be an integer >= 0"),
    ({"base_url": "localhost:8000/v1"}, "base URL must be http"),
    ({"base_url": "ftp://example.com/v1"}, "base URL must be http"),
])
def test_bad_settings_are_value_errors(kwargs, message):
    settings = {"base_url": "http://127.0.0.1:1/v1", "model": "tiny", **kwargs}
    with pytest.raises(ValueError, match=message):
        LLMJudge(**settings)


def test_the_plain_openai_client_would_send_the_request_to_another_origin(servers, monkeypatch):
    """Why the judge checks redirects itself: the `openai` client alone follows a 307 to another origin with the
    POST body (the prompts and answers); httpx drops the key there, but keeps it on an http -> https upgrade."""
    import openai

    a, b = servers
    a.answer.table["/v1/chat/completions"] = (307, {"Location": f"{b.origin}/v1/chat/completions"}, b"")
    b.answer.table["/v1/chat/completions"] = COMPLETION
    client = openai.OpenAI(base_url=a.base_url, api_key="sk-test-secret", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "private prompt"}])
    client.close()
    assert reply.choices[0].message.content == "A"
    assert [r["json"]["messages"][0]["content"] for r in b.requests] == ["private prompt"]
    assert b.requests[0]["authorization"] is None
