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

Requests that fail with a connection error, a timeout (`timeout` seconds per request, default 60),
HTTP 408, 429 or 5xx are retried with exponential backoff (`backoff_seconds * 2**attempt`); after
`max_retries` retries, or on another HTTP error, a `JudgeEndpointError` names the URL that failed (after
a redirect, the URL redirected to).

Redirects: a redirect (HTTP 301, 302, 303, 307, 308) to the same origin (scheme, host and port) is
followed by sending the same POST, body and headers to the new address (a chat completion is only a POST;
at most `MAX_REDIRECTS` in a row). A redirect to another origin is never followed, with or without an API
key: neither the key nor the prompts and answers are sent to a server the user did not name. It is a
`JudgeEndpointError` naming both addresses; if the new one is trusted, pass it as the base URL. Every verdict is appended to a JSONL cache keyed by a SHA-256 hash
of (model, template, prompt, first answer, second answer), so an interrupted evaluation resumes without
asking twice. Only the standard library is used.

The prompt templates are in `TEMPLATES` below (`--judge_template`): `default`, a general pairwise
comparison answered with one word, and `tldr`, the paper's TL;DR protocol (it follows the DPO paper's GPT-4
summarization win rate: which summary of the forum post is better, the reply a one-sentence comparison then
`Preferred: A` or `B`), for the policy's summaries against the reference summaries of the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
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

TLDR_TEMPLATE = """Which of the following summaries does a better job of summarizing the most important points in the \
given forum post, without including unimportant or irrelevant details? A good summary is both precise and concise.

Post:
{prompt}

Summary A:
{answer_a}

Summary B:
{answer_b}

FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new \
line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""
"""The GPT-4 summarization prompt of the DPO paper (Rafailov et al., 2023, arXiv 2305.18290, appendix), which
the TL;DR win rates of the HyPO paper follow: the policy's summary against the reference summary."""

_VERDICT_RE = re.compile(r"^(?:response|answer)?\s*(a|b|tie)$")
_RETRY_CODES = {408, 429, 500, 502, 503, 504}
_REDIRECT_CODES = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
"""Redirects followed in a row (all within the endpoint's origin) before the request fails."""


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


_PREFERRED_RE = re.compile(r"preferred\W*(?:summary|response)?\W*\b(a|b|tie)\b", re.IGNORECASE)


def parse_preferred(text: str) -> str | None:
    """"A", "B" or "tie" from a reply in the `tldr` template's format, the last "Preferred: X" line
    ("Comparison: A is shorter ...\nPreferred: A", "**Preferred:** \"B\""); a reply of just the verdict
    is read as `parse_verdict` reads it; None otherwise."""
    matches = _PREFERRED_RE.findall(text)
    if matches:
        verdict = matches[-1].lower()
        return "tie" if verdict == "tie" else verdict.upper()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return parse_verdict(lines[-1]) if lines else None


@dataclass(frozen=True)
class JudgeTemplate:
    """A prompt with `{prompt}`, `{answer_a}` and `{answer_b}`, the parser of its replies, and the reply
    length it needs."""

    text: str
    parse: Callable[[str], str | None]
    max_tokens: int


TEMPLATES = {
    "default": JudgeTemplate(TEMPLATE, parse_verdict, 8),
    "tldr": JudgeTemplate(TLDR_TEMPLATE, parse_preferred, 256),
}


class _RedirectsAsErrors(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to any host with the Authorization header (and turn the POST into a
    GET); here a redirect comes back as an `HTTPError` that `LLMJudge` handles itself."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what a redirect must keep."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a malformed port never matches
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


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
                 cache_path: str | Path | None = None, seed: int = 0, template: str | JudgeTemplate = TEMPLATE,
                 max_retries: int = 4, backoff_seconds: float = 1.0, timeout: float = 60.0,
                 max_tokens: int | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        if urllib.parse.urlsplit(self.url).scheme.lower() not in ("http", "https") or not _origin(self.url)[1]:
            raise ValueError(f"LLM judge base URL must be http(s)://host[:port]/path, got {base_url!r}")
        if not 0 < timeout < float("inf"):
            raise ValueError(f"LLM judge timeout must be a positive number of seconds, got {timeout!r}")
        if max_retries < 0:
            raise ValueError(f"LLM judge max_retries must be >= 0, got {max_retries!r}")
        self._opener = urllib.request.build_opener(_RedirectsAsErrors)
        if isinstance(template, str):  # a prompt of the default's reply format
            template = JudgeTemplate(template, parse_verdict, TEMPLATES["default"].max_tokens)
        self.model, self.api_key_env, self.seed, self.template = model, api_key_env, seed, template.text
        self.parse = template.parse
        self.max_retries, self.backoff_seconds, self.timeout = max_retries, backoff_seconds, timeout
        self.max_tokens = template.max_tokens if max_tokens is None else max_tokens
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
        verdict = self.parse(reply)
        if verdict is None:
            self.unparsed += 1
            logger.warning("LLM judge reply %r has no verdict (A, B or tie); counted as a tie", reply[-80:])
            return "tie"
        return verdict

    def _content(self, raw: bytes, url: str) -> str:
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeEndpointError(f"LLM judge endpoint {url} sent no chat completion: {raw[:200]!r}") from None

    def _redirect(self, url: str, error: urllib.error.HTTPError, hops: int) -> str:
        """Where a redirect answer points, if it may be followed (see the module docstring)."""
        location = error.headers.get("Location")
        error.close()
        if not location:
            raise JudgeEndpointError(f"LLM judge endpoint {url} answered HTTP {error.code} without a Location")
        target = urllib.parse.urljoin(url, location)
        if _origin(target) != _origin(url):
            raise JudgeEndpointError(
                f"LLM judge endpoint {url} redirected (HTTP {error.code}) to {target}, another origin; requests "
                "and API keys are never sent to a server other than the one named: if you trust it, use that "
                "address as the base URL (--judge-base-url)")
        if hops >= MAX_REDIRECTS:
            raise JudgeEndpointError(f"LLM judge endpoint {self.url}: more than {MAX_REDIRECTS} redirects "
                                     f"(the last to {target})")
        logger.info("LLM judge: %s redirects (HTTP %d) to %s", url, error.code, target)
        return target

    def _chat(self, content: str) -> str:
        """One chat completion, retried with exponential backoff on transient failures."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            url, hops = self.url, 0
            while True:  # one attempt: the request and its same-origin redirects
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                self.requests += 1
                try:
                    with self._opener.open(request, timeout=self.timeout) as response:
                        return self._content(response.read(), url)
                except urllib.error.HTTPError as error:
                    if error.code in _REDIRECT_CODES:
                        url, hops = self._redirect(url, error, hops), hops + 1
                        continue
                    if error.code not in _RETRY_CODES:
                        detail = error.read().decode(errors="replace")[:200]
                        raise JudgeEndpointError(f"LLM judge endpoint {url} answered HTTP {error.code}: "
                                                 f"{detail}") from None
                    reason = f"HTTP {error.code}"
                except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                    reason = str(getattr(error, "reason", error))
                break
            if attempt < self.max_retries:
                delay = self.backoff_seconds * 2**attempt
                logger.warning("LLM judge %s: %s; retrying in %.1f s", url, reason, delay)
                time.sleep(delay)
        raise JudgeEndpointError(f"LLM judge endpoint {url} is unreachable after {self.max_retries + 1} "
                                 f"attempts (last error: {reason}); check --judge-base-url")
