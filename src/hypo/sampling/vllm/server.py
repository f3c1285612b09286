"""Server mode: a `vllm serve` process reached over HTTP.

Samples come from `POST /v1/completions`; weights go through one safetensors file in a folder the server can
read, which it reloads (`POST /collective_rpc` with `reload_weights`, a development endpoint: start the server
with `VLLM_SERVER_DEV_MODE=1`), then its prefix cache is cleared (keys and values computed with the old
weights). Servers should be started with `--generation-config vllm` (vLLM's own neutral defaults, not the
model's `generation_config.json`); the request values override either way. Server failures (down, too slow,
gone mid-run, a wrong answer) raise `VLLMServerError` naming the URL and what was being done; nothing falls
back to another backend. See docs/vllm.md.
"""

from __future__ import annotations

import atexit
import http.client
import json
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from hypo.sampling.generate import Completions
from hypo.sampling.vllm.protocol import (
    VLLMServerError,
    completion_request,
    completions_from_samples,
    prompt_token_lists,
    samples_from_completion_response,
)
from hypo.sampling.vllm.weights import WeightPush, default_weights_dir, vllm_weights, write_weights


class VLLMServerClient:
    """A `vllm serve` process reached over HTTP: sampling with `/v1/completions`, weight pushes through a folder
    both processes see.

    `timeout` bounds the wait for the server to come up (`wait_until_ready`) and every request. `weights_dir`
    must be readable by the server under the same path (default: a new folder in /dev/shm, which a server on
    the same machine sees).
    """

    pushes_from_main_process = True  # one server: the main process pushes the full weights, the others wait

    def __init__(self, base_url: str, *, timeout: float = 240.0, weights_dir: str | Path | None = None,
                 weights_dtype: torch.dtype | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._weights_dir = Path(weights_dir) if weights_dir is not None else None
        self._own_weights_dir = weights_dir is None
        self.weights_dtype = weights_dtype
        self.model: str | None = None
        self.max_model_len: int | None = None

    @property
    def weights_dir(self) -> Path:
        """Where pushes are written; the default folder is made at the first use (processes that never push
        make none)."""
        if self._weights_dir is None:
            self._weights_dir = default_weights_dir()
            atexit.register(shutil.rmtree, self._weights_dir, True)  # /dev/shm is memory: never leave it behind
        return self._weights_dir

    # transport

    def _request(self, method: str, path: str, what: str, body: dict | None = None,
                 timeout: float | None = None) -> Any:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        timeout = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:800]
            hint = (" (the server needs VLLM_SERVER_DEV_MODE=1 for this development endpoint)"
                    if exc.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache", "/server_info") else "")
            raise VLLMServerError(f"vLLM server {self.base_url}: {what}: {method} {path} answered HTTP {exc.code}"
                                  f"{hint}: {detail}") from None
        except TimeoutError as exc:
            raise VLLMServerError(f"vLLM server {self.base_url}: {what}: no answer to {method} {path} within "
                                  f"{timeout:g} s (vllm_server_timeout)") from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise VLLMServerError(f"vLLM server {self.base_url}: {what}: no answer to {method} {path} within "
                                      f"{timeout:g} s (vllm_server_timeout)") from exc
            raise VLLMServerError(f"vLLM server {self.base_url}: {what}: cannot connect ({reason}); is it running? "
                                  "(docs/vllm.md: starting a server)") from exc
        except (ConnectionError, http.client.HTTPException) as exc:
            raise VLLMServerError(f"vLLM server {self.base_url}: {what}: the connection broke during {method} {path} "
                                  f"({type(exc).__name__}: {exc}); did the server stop?") from exc
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise VLLMServerError(f"vLLM server {self.base_url}: {what}: {method} {path} answered no JSON: "
                                  f"{raw[:200]!r}") from None

    # set-up

    def wait_until_ready(self, timeout: float | None = None) -> VLLMServerClient:
        """Poll `/health` until the server answers (up to `timeout`, default the client's), then read the
        served model's name and context length from `/v1/models`, and its dtype from `/server_info` (a
        development endpoint: a server without them fails here, before training, not at the first push).
        Pushed weights are written in the server's dtype (the engine would cast them anyway): half the bytes
        for a bfloat16 server."""
        timeout = self.timeout if timeout is None else timeout
        deadline, last = time.monotonic() + timeout, None
        while True:
            try:
                self._request("GET", "/health", "waiting for the server", timeout=min(10.0, timeout))
                break
            except VLLMServerError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise VLLMServerError(f"vLLM server {self.base_url} not ready after {timeout:g} s "
                                      f"(vllm_server_timeout); last error: {last}")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        models = self._request("GET", "/v1/models", "reading the served model")
        try:
            entry = models["data"][0]
            self.model, self.max_model_len = entry["id"], entry.get("max_model_len")
        except (KeyError, IndexError, TypeError):
            raise VLLMServerError(f"vLLM server {self.base_url}: /v1/models lists no model: {models!r}"[:500]) from None
        info = self._request("GET", "/server_info", "checking for the development endpoints that reload weights")
        match = re.search(r"\bdtype=torch\.(\w+)", str((info or {}).get("vllm_config", "")))
        if self.weights_dtype is None and match and isinstance(getattr(torch, match[1], None), torch.dtype):
            self.weights_dtype = getattr(torch, match[1])
        return self

    def check_length(self, longest_prompt: int, max_new_tokens: int) -> None:
        """Refuse a server whose context is shorter than the longest prompt plus `max_completion_length`."""
        if self.max_model_len is not None and longest_prompt + max_new_tokens > self.max_model_len:
            raise VLLMServerError(f"vLLM server {self.base_url}: max_model_len {self.max_model_len} < prompt "
                                  f"{longest_prompt} + completion {max_new_tokens} tokens; restart it with a larger "
                                  "--max-model-len")

    # sampling

    @torch.no_grad()
    def generate(self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, *, num_generations: int,
                 max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int) -> Completions:
        """`num_generations` samples per prompt from the served weights, in one request (the arguments and the
        result of `hypo.sampling.generate.generate_completions`, at temperature 1 with no truncation: the KL samples).

        Shape: prompt_input_ids (G, P) left-padded -> Completions with G * k rows
        """
        if self.model is None:
            self.wait_until_ready()
        prompts = prompt_token_lists(prompt_input_ids, prompt_attention_mask)
        self.check_length(max(len(p) for p in prompts), max_new_tokens)
        stop_ids = torch.as_tensor(eos_token_id).reshape(-1).tolist()
        body = completion_request(prompts, model=self.model, num_generations=num_generations,
                                  max_tokens=max_new_tokens, stop_token_ids=stop_ids)
        response = self._request("POST", "/v1/completions", f"sampling {len(prompts)} prompts x {num_generations}",
                                 body)
        try:
            samples = samples_from_completion_response(response, prompts, num_generations)
        except (KeyError, TypeError) as exc:
            raise VLLMServerError(f"vLLM server {self.base_url}: sampling: unexpected answer ({exc!r}): "
                                  f"{str(response)[:300]}") from None
        return completions_from_samples(prompt_input_ids, prompt_attention_mask, samples,
                                        num_generations=num_generations, max_new_tokens=max_new_tokens,
                                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    # weights

    def push_weights(self, model_or_state_dict) -> WeightPush:
        """Write the policy's weights to `weights_dir/model.safetensors`, have the server reload them, and clear
        its prefix cache. Call it on the main process with the full weights, after each optimizer step. The file
        replaces the previous one, deleted first; a folder without room for it is an error at the first push,
        before training (`hypo.sampling.vllm.weights.write_weights`)."""
        start = time.perf_counter()  # tensor by tensor, each cast to the server's dtype before it leaves the GPU
        tensors, size = write_weights(vllm_weights(model_or_state_dict, dtype=self.weights_dtype), self.weights_dir)
        written = time.perf_counter()
        self._request("POST", "/collective_rpc", f"reloading weights from {self.weights_dir}",
                      {"method": "reload_weights", "kwargs": {"weights_path": str(self.weights_dir)}})
        self.reset_prefix_cache()
        return WeightPush(tensors, size, written - start, time.perf_counter() - written)

    def reset_prefix_cache(self, attempts: int = 5) -> None:
        """Drop cached keys and values (computed with earlier weights); vLLM refuses while blocks are in use."""
        for attempt in range(attempts):
            answer = self._request("POST", "/reset_prefix_cache", "clearing the prefix cache")
            if not isinstance(answer, dict) or answer.get("success", True):
                return
            time.sleep(0.2 * (attempt + 1))
        raise VLLMServerError(f"vLLM server {self.base_url}: the prefix cache could not be cleared after a weight "
                              f"update ({attempts} tries): samples would reuse keys and values of older weights")

    def close(self) -> None:
        """Remove the weights folder if this client made it."""
        if self._own_weights_dir and self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None


