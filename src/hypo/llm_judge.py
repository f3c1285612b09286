"""Pairwise judge: a chat model behind any OpenAI-compatible endpoint says which of two answers is better.

Usage: `hypo eval --judge llm --judge-base-url http://localhost:8000/v1 --judge-model NAME`. The API key
is read from the environment variable named by `--judge-api-key-env` (default `OPENAI_API_KEY`; none is
sent when it is unset); it is never written to disk or to the logs.

Protocol, for each (prompt, policy answer, baseline answer):

1. The order of the two answers is drawn per item from a seeded hash of (seed, prompt, answers), so
   the policy answer is shown first about half the time (position bias cancels on average) and the
   same item always gets the same order.
2. `TEMPLATE` below is filled in and sent as one user message to `POST {base_url}/chat/completions`
   with temperature 0 and a few output tokens.
3. The reply is parsed as "A", "B" or "tie" (case, punctuation and a leading "Response" are ignored);
   anything else counts as a tie and is logged as unparsed.
4. The verdict is mapped back to the original order: 1.0 if the policy answer wins, 0.0 if the
   baseline wins, 0.5 for a tie.

Requests that fail with a connection error, a timeout, HTTP 429 or 5xx are retried with exponential
backoff (`backoff_seconds * 2**attempt`); after `max_retries` retries, or on another HTTP error, a
`JudgeEndpointError` names the URL. Every verdict is appended to a JSONL cache keyed by a SHA-256 hash
of (model, template, prompt, first answer, second answer), so an interrupted evaluation resumes without
asking twice. Only the standard library is used.

The prompt template is `TEMPLATE` below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPLATE = """You are an impartial judge. Compare two responses to the same user request and decide which one
is better: more helpful, accurate, relevant and well written. Ignore the order in which they are
shown and their length unless it matters for quality.

[User request]
{prompt}

[Response A]
{answer_a}

[Response B]
{answer_b}

Answer with exactly one word: A if Response A is better, B if Response B is better, or tie."""

_VERDICT_RE = re.compile(r"^(?:response|answer)?\s*(a|b|tie)$")
_RETRY_CODES = {408, 429, 500, 502, 503, 504}


class JudgeEndpointError(RuntimeError):
    """The judge endpoint could not be reached, or refused the request."""


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a reply such as "A", " b.", "**Response B**", "Tie"; None otherwise."""
    cleaned = re.sub(r"[^a-z ]", "", text.strip().lower()).strip()
    match = _VERDICT_RE.match(cleaned)
    if match is None:
        return None
    verdict = match.group(1)
    return "tie" if verdict == "tie" else verdict.upper()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


class VerdictCache:
    """Append-only JSONL of {"key", "verdict"}; a torn last line (an interrupted write) is ignored."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.verdicts: dict[str, str] = {}
        if self.path and self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # end a torn line so that new records start clean
                with self.path.open("a") as f:
                    f.write("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.verdicts[record["key"]] = record["verdict"]

    def get(self, key: str) -> str | None:
        return self.verdicts.get(key)

    def put(self, key: str, verdict: str) -> None:
        self.verdicts[key] = verdict
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "verdict": verdict}) + "\n")


class LLMJudge:
    """Pairwise judge over an OpenAI-compatible chat endpoint (see the module docstring)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 cache_path: str | Path | None = None, seed: int = 0, template: str = TEMPLATE,
                 max_retries: int = 4, backoff_seconds: float = 1.0, timeout: float = 60.0, max_tokens: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.seed, self.template = model, api_key_env, seed, template
        self.max_retries, self.backoff_seconds, self.timeout, self.max_tokens = max_retries, backoff_seconds, \
            timeout, max_tokens
        self.cache = VerdictCache(cache_path)
        self.name = f"llm:{model}"
        self.requests = 0  # HTTP requests sent (retries included)
        self.unparsed = 0

    def swapped(self, prompt: str, completion_a: str, completion_b: str) -> bool:
        """Whether `completion_b` is shown first: a seeded coin per item, the same on every run."""
        return int(_digest(str(self.seed), prompt, completion_a, completion_b)[:8], 16) % 2 == 1

    def compare(self, prompt: str, completion_a: str, completion_b: str) -> float:
        """1.0 if `completion_a` is judged better, 0.0 if `completion_b`, 0.5 for a tie."""
        swap = self.swapped(prompt, completion_a, completion_b)
        first, second = (completion_b, completion_a) if swap else (completion_a, completion_b)
        key = _digest(self.model, self.template, prompt, first, second)
        verdict = self.cache.get(key)
        if verdict is None:
            verdict = self._verdict(self.template.format(prompt=prompt, answer_a=first, answer_b=second))
            self.cache.put(key, verdict)
        if verdict == "tie":
            return 0.5
        first_wins = verdict == "A"
        return float(first_wins != swap)

    def _verdict(self, content: str) -> str:
        reply = self._chat(content)
        verdict = parse_verdict(reply)
        if verdict is None:
            self.unparsed += 1
            logger.warning("LLM judge reply %r is not A, B or tie; counted as a tie", reply[:80])
            return "tie"
        return verdict

    def _content(self, raw: bytes) -> str:
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeEndpointError(f"LLM judge endpoint {self.url} sent no chat completion: "
                                     f"{raw[:200]!r}") from None

    def _chat(self, content: str) -> str:
        """One chat completion, retried with exponential backoff on transient failures."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as error:
                if error.code not in _RETRY_CODES:
                    detail = error.read().decode(errors="replace")[:200]
                    raise JudgeEndpointError(f"LLM judge endpoint {self.url} answered HTTP {error.code}: "
                                             f"{detail}") from None
                reason = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = str(getattr(error, "reason", error))
            if attempt < self.max_retries:
                delay = self.backoff_seconds * 2**attempt
                logger.warning("LLM judge %s: %s; retrying in %.1f s", self.url, reason, delay)
                time.sleep(delay)
        raise JudgeEndpointError(f"LLM judge endpoint {self.url} is unreachable after {self.max_retries + 1} "
                                 f"attempts (last error: {reason}); check --judge-base-url")
