"""Pairwise judge: a chat model behind any OpenAI-compatible endpoint says which of two answers is better.

Usage: `hypo eval --judge llm --judge_base_url http://localhost:8000/v1 --judge_model NAME`, with the `openai`
package (`pip install 'hypo[judge]'`). The API key is read from the environment variable named by
`--judge_api_key_env` (default `OPENAI_API_KEY`); when that variable is unset no Authorization header is sent,
whatever else the environment holds. The key is never written to disk or to the logs.

Protocol, for each (prompt, policy answer, baseline answer):

1. The order of the two answers is drawn per item from a seeded hash of (seed, prompt, answers), so
   the policy answer is shown first about half the time (position bias cancels on average) and the
   same item always gets the same order.
2. The template (`TEMPLATES`, `--judge_template`) is filled in and sent as one user message with the
   `openai` client's `chat.completions.create`, temperature 0, a few output tokens.
3. The reply is parsed by the template's parser as "A", "B" or "tie". A reply that is none of these is
   unreadable: it goes back to the judge as the assistant turn of the same conversation, followed by the
   template's `correction` (the format it must answer in), at most `parse_retries` times. A judgment whose
   replies all stayed unreadable is **invalid**: neither a win, a loss nor a tie (`compare` returns None),
   reported as such (`num_invalid`) and left out of the win rate by `hypo.evaluation.held_out.summarize`.
4. The verdict is mapped back to the original order: 1.0 if the policy answer wins, 0.0 if the
   baseline wins, 0.5 for a tie.

Requests run `concurrency` at a time (threads sharing one client). Results and cache do not depend on the
concurrency: each item's order is a function of the item, identical items are asked once, and verdicts are
appended to the cache in the items' order.

Transport (the `openai` client): `timeout` seconds per request; connection errors, timeouts, HTTP 408, 409,
429 and 5xx are retried `max_retries` times with the client's exponential backoff (0.5 s doubling to at most
8 s, with jitter; a server's Retry-After is honoured); then a `JudgeEndpointError` names the URL.

Redirects: one is followed only within the endpoint's origin (scheme, host and port) and only when it keeps
the POST and its body (HTTP 307 and 308; at most `MAX_REDIRECTS` in a row). A redirect to another origin is
refused before anything is sent there, with or without an API key: neither the key nor the prompts and
answers go to a server the user did not name (the `openai` client alone would follow it with the body, and
with the key to the same host over https). HTTP 301, 302 and 303 would turn the request into a GET: refused
too. The `JudgeEndpointError` names both addresses; if the new one is trusted, pass it as the base URL.

Cache: every readable verdict is appended to a JSONL file keyed by a SHA-256 hash of (model, template,
prompt, first answer, second answer), so an interrupted evaluation resumes without asking twice. Invalid
judgments are not cached: like a failed request, they are asked again by the next run (after a change of
judge model, template or server, or when the unreadable reply was a fluke), at the cost of those requests.

The prompt templates: `default`, a general pairwise comparison answered with one word, and `tldr`, the
paper's TL;DR protocol (it follows the DPO paper's GPT-4 summarization win rate: which summary of the forum
post is better, the reply a one-sentence comparison then `Preferred: A` or `B`), for the policy's summaries
against the reference summaries of the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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

CORRECTION = ("Your reply could not be read as a verdict. Answer with exactly one word: A if Response A is "
              "better, B if Response B is better, or tie.")

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

TLDR_CORRECTION = """Your reply could not be read: it must end with a line "Preferred: A" or "Preferred: B". \
Answer again in the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""

VERDICTS = ("A", "B", "tie")
MAX_REDIRECTS = 5
"""Redirects followed in a row (all within the endpoint's origin, all keeping the POST) before a request fails."""

_VERDICT_RE = re.compile(r"^(?:response|answer)?\s*(a|b|tie)$")
_PREFERRED_RE = re.compile(r"preferred\W*(?:summary|response)?\W*\b(a|b|tie)\b", re.IGNORECASE)
_HOPS = "hypo_redirects"  # per-request extension: same-origin redirects followed so far


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
    """A prompt with `{prompt}`, `{answer_a}` and `{answer_b}`, the parser of its replies, the reply length it
    needs, and the message that asks again after an unreadable reply."""

    text: str
    parse: Callable[[str], str | None]
    max_tokens: int
    correction: str = CORRECTION


TEMPLATES = {
    "default": JudgeTemplate(TEMPLATE, parse_verdict, 8, CORRECTION),
    "tldr": JudgeTemplate(TLDR_TEMPLATE, parse_preferred, 256, TLDR_CORRECTION),
}


@dataclass(frozen=True)
class Judgment:
    """One comparison: `win` is 1.0 (the first completion given is better), 0.0, 0.5 (a tie), or None when
    every reply was unreadable (an invalid judgment; `reply` is the last one)."""

    win: float | None
    reply: str | None = None


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
    """Append-only JSONL of {"key", "verdict"} ("A", "B" or "tie"); a torn last line (an interrupted write) and
    records of anything else are ignored."""

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
                    key, verdict = record["key"], record["verdict"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                if verdict in VERDICTS:
                    self.verdicts[key] = verdict

    def get(self, key: str) -> str | None:
        return self.verdicts.get(key)

    def put(self, key: str, verdict: str) -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"only readable verdicts are cached ({', '.join(VERDICTS)}), got {verdict!r}")
        self.verdicts[key] = verdict
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "verdict": verdict}) + "\n")


class LLMJudge:
    """Pairwise judge over an OpenAI-compatible chat endpoint (see the module docstring)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 cache_path: str | Path | None = None, seed: int = 0, template: str | JudgeTemplate = TEMPLATE,
                 max_retries: int = 4, timeout: float = 60.0, max_tokens: int | None = None,
                 concurrency: int = 1, parse_retries: int = 2):
        base_url = base_url.rstrip("/")
        if urllib.parse.urlsplit(base_url).scheme.lower() not in ("http", "https") or not _origin(base_url)[1]:
            raise ValueError(f"LLM judge base URL must be http(s)://host[:port]/path, got {base_url!r}")
        if not 0 < timeout < float("inf"):
            raise ValueError(f"LLM judge timeout must be a positive number of seconds, got {timeout!r}")
        for name, value, low in (("max_retries", max_retries, 0), ("concurrency", concurrency, 1),
                                 ("parse_retries", parse_retries, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"LLM judge {name} must be an integer >= {low}, got {value!r}")
        if isinstance(template, str):  # a prompt of the default's reply format
            template = JudgeTemplate(template, parse_verdict, TEMPLATES["default"].max_tokens)
        self.url = base_url + "/chat/completions"
        self.model, self.api_key_env, self.seed, self.template = model, api_key_env, seed, template.text
        self.parse, self.correction = template.parse, template.correction
        self.max_retries, self.timeout = max_retries, timeout
        self.max_tokens = template.max_tokens if max_tokens is None else max_tokens
        self.concurrency, self.parse_retries = concurrency, parse_retries
        self.cache = VerdictCache(cache_path)
        self.name = f"llm:{model}"
        self.requests = 0  # HTTP requests sent (retries and redirects included)
        self.unreadable_replies = 0  # replies with no verdict, whether a later reply was readable or not
        self.invalid = 0  # judgments whose every reply was unreadable
        self._lock = threading.Lock()
        self._local = threading.local()  # requests of the current thread's call
        self._client = self._make_client(base_url)

    def _make_client(self, base_url: str):
        try:
            import openai
        except ImportError:
            raise ImportError("the LLM judge needs the openai package: pip install 'hypo[judge]'") from None
        key = os.environ.get(self.api_key_env)
        # Without a key the Authorization header is omitted per request (`_chat`); the client itself wants some key.
        self._auth = {} if key else {"Authorization": openai.omit}
        http = openai.DefaultHttpxClient(follow_redirects=True, max_redirects=MAX_REDIRECTS + 1, event_hooks={
            "request": [self._count_request], "response": [self._check_redirect]})
        return openai.OpenAI(base_url=base_url, api_key=key or "unused", admin_api_key="", timeout=self.timeout,
                             max_retries=self.max_retries, http_client=http)

    def close(self) -> None:
        """Close the HTTP connections (the judge cannot be used afterwards)."""
        self._client.close()

    def _count_request(self, request) -> None:
        with self._lock:
            self.requests += 1
        self._local.requests = getattr(self._local, "requests", 0) + 1

    def _check_redirect(self, response) -> None:
        """Let the HTTP client follow a redirect only within the origin and with the same POST; else stop."""
        import openai

        if not response.has_redirect_location:
            return
        url = str(response.request.url)
        target = urllib.parse.urljoin(url, response.headers["Location"])
        hops = response.request.extensions.get(_HOPS, 0)
        if _origin(target) != _origin(url):
            reason = ("another origin; requests and API keys are never sent to a server other than the one "
                      "named: if you trust it, use that address as the base URL (--judge_base_url)")
        elif response.status_code not in (307, 308):
            reason = "which would turn the POST into a GET: use that address as the base URL (--judge_base_url)"
        elif hops >= MAX_REDIRECTS:
            raise openai.OpenAIError(f"LLM judge endpoint {self.url}: more than {MAX_REDIRECTS} redirects "
                                     f"(the last to {target})")
        else:
            response.request.extensions[_HOPS] = hops + 1  # copied into the request that follows
            logger.info("LLM judge: %s redirects (HTTP %d) to %s", url, response.status_code, target)
            return
        # an OpenAIError passes through the client's retry loop at once
        raise openai.OpenAIError(f"LLM judge endpoint {url} redirected (HTTP {response.status_code}) to {target}, "
                                 f"{reason}")

    def swapped(self, prompt: str, completion_a: str, completion_b: str) -> bool:
        """Whether `completion_b` is shown first: a seeded coin per item, the same on every run."""
        return int(_digest(str(self.seed), prompt, completion_a, completion_b)[:8], 16) % 2 == 1

    def compare(self, prompt: str, completion_a: str, completion_b: str) -> float | None:
        """1.0 if `completion_a` is judged better, 0.0 if `completion_b`, 0.5 for a tie, None if invalid."""
        return self.judge_all([(prompt, completion_a, completion_b)])[0].win

    def judge_all(self, items: list[tuple[str, str, str]]) -> list[Judgment]:
        """`compare` for each (prompt, completion_a, completion_b), `concurrency` requests at a time. Verdicts
        are cached in the items' order; if a request fails, the verdicts already received are cached before the
        `JudgeEndpointError` is raised."""
        plans = []  # (swap, key, content) per item
        for prompt, completion_a, completion_b in items:
            swap = self.swapped(prompt, completion_a, completion_b)
            first, second = (completion_b, completion_a) if swap else (completion_a, completion_b)
            plans.append((swap, _digest(self.model, self.template, prompt, first, second),
                          self.template.format(prompt=prompt, answer_a=first, answer_b=second)))
        asked: dict[str, tuple[str, str]] = {}  # key -> (verdict or "invalid", last reply)
        pending = {key: content for _, key, content in plans if self.cache.get(key) is None}
        if pending:
            asked = self._ask_all(pending)
        judgments = []
        for swap, key, _ in plans:
            verdict, reply = asked.get(key) or (self.cache.get(key), None)
            if verdict == "invalid":
                judgments.append(Judgment(None, reply))
            else:
                judgments.append(Judgment(0.5 if verdict == "tie" else float((verdict == "A") != swap)))
        return judgments

    def _ask_all(self, pending: dict[str, str]) -> dict[str, tuple[str, str]]:
        """The verdict of each key's content, in the dict's order; readable ones are cached as they arrive
        in that order (a failure first cancels the requests not yet started, then caches those finished)."""
        answers: dict[str, tuple[str, str]] = {}

        def record(key: str, future: Future) -> None:
            answers[key] = future.result()
            if answers[key][0] != "invalid":
                self.cache.put(key, answers[key][0])

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pending))) as pool:
            futures = {key: pool.submit(self._ask, content) for key, content in pending.items()}
            try:
                for key, future in futures.items():
                    record(key, future)
            except BaseException:
                for future in futures.values():
                    future.cancel()
                pool.shutdown(wait=True)
                for key, future in futures.items():
                    if key not in answers and future.done() and not future.cancelled() and not future.exception():
                        record(key, future)
                raise
        return answers

    def _ask(self, content: str) -> tuple[str, str]:
        """(verdict, last reply): "A", "B" or "tie", or "invalid" after `parse_retries` unreadable replies
        each answered with the template's correction."""
        messages = [{"role": "user", "content": content}]
        for attempt in range(self.parse_retries + 1):
            reply = self._chat(messages)
            verdict = self.parse(reply)
            if verdict is not None:
                return verdict, reply
            with self._lock:
                self.unreadable_replies += 1
                self.invalid += attempt == self.parse_retries
            logger.warning("LLM judge reply %r has no verdict (A, B or tie); %s", reply[-80:],
                           "asking again" if attempt < self.parse_retries else "the judgment is invalid")
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": self.correction}]
        return "invalid", reply

    def _chat(self, messages: list[dict]) -> str:
        """One chat completion (the client retries transient failures); errors become `JudgeEndpointError`."""
        import openai

        self._local.requests = 0
        try:
            completion = self._client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens,
                extra_headers=self._auth)
        except openai.APIStatusError as error:
            url, code = error.response.url, error.status_code
            if code in (408, 409, 429) or code >= 500:
                raise JudgeEndpointError(f"LLM judge endpoint {url} is unreachable after {self._local.requests} "
                                         f"attempts (last error: HTTP {code}); check --judge_base_url") from None
            detail = error.response.text[:200]
            raise JudgeEndpointError(f"LLM judge endpoint {url} answered HTTP {code}: {detail}") from None
        except openai.APIConnectionError as error:  # timeouts too
            cause = error.__cause__ or error
            raise JudgeEndpointError(f"LLM judge endpoint {self.url} is unreachable after {self._local.requests} "
                                     f"attempts (last error: {type(cause).__name__}: {cause}); check "
                                     "--judge_base_url") from None
        except openai.OpenAIError as error:  # a refused redirect, a reply that is no chat completion
            raise JudgeEndpointError(str(error)) from None
        try:
            return completion.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise JudgeEndpointError(f"LLM judge endpoint {self.url} sent no chat completion: "
                                     f"{str(completion)[:200]!r}") from None
