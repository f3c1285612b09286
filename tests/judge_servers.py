"""Stand-in OpenAI-compatible servers on 127.0.0.1 for the LLM-judge tests: each records every request (method,
path, headers, body) and how many were in flight at once, and answers through a function of the request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = tuple[int, dict, bytes]  # status, extra headers, body


def completion(content: str, model: str = "judge") -> bytes:
    """The body of a chat completion whose reply is `content`."""
    return json.dumps({"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


def chat(reply: Callable[[list[dict]], str]) -> Callable[[dict], Answer]:
    """An answer function for `/v1/chat/completions`: `reply(messages)` is the assistant's content."""

    def answer(request: dict) -> Answer:
        if request["path"] != "/v1/chat/completions" or request["method"] != "POST":
            return 404, {}, b"no such path"
        body = json.loads(request["body"])
        return 200, {"Content-Type": "application/json"}, completion(reply(body["messages"]), body["model"])

    return answer


class StandInServer:
    """A threaded HTTP server (its own port: its own origin). `answer(request) -> (status, headers, body)`;
    `delay` seconds before each answer; `requests` lists {"method", "path", "body", "authorization", "json"}
    in arrival order; `max_in_flight` is the most requests it held at once."""

    def __init__(self, answer: Callable[[dict], Answer] | None = None, delay: float = 0.0):
        self.answer = answer or (lambda request: (404, {}, b"no such path"))
        self.delay = delay
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def contents(self) -> list[str]:
        """The last user message of each chat request, in arrival order."""
        return [r["json"]["messages"][-1]["content"] for r in self.requests if r.get("json")]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = None
                request = {"method": self.command, "path": self.path, "body": body, "json": parsed,
                           "authorization": self.headers.get("Authorization")}
                with server.lock:
                    server.requests.append(request)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    with server.lock:  # answers in arrival order for stateful answer functions
                        status, headers, reply = server.answer(request)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            do_GET = do_POST = _serve  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
