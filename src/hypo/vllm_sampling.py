"""Online samples from vLLM: a `vllm serve` process (server mode) or an engine in this process (colocate).

The KL term needs exact draws from the current policy (DESIGN section 2), so every request switches off what
could change the distribution, whatever the model's generation config or the server's defaults say:
temperature 1, top_p 1, top_k 0, min_p 0, no repetition / presence / frequency penalty, no minimum length, no
logit bias, no bad words; it stops at every stop id of the model (`hypo.sampling.stop_token_ids`) and after
`max_completion_length` tokens. Servers should also be started with `--generation-config vllm` (vLLM's own
neutral defaults, not the model's `generation_config.json`); the request values override either way.

The result is a `hypo.sampling.Completions` with the same rows, padding and masks as
`generate_completions`, so the loop can swap backends. `sampling_per_token_logps` holds vLLM's own log-probs
of the sampled tokens, for parity checks only: the KL surrogate always uses our forward's log-probs.

Weights: after each optimizer step the policy's weights go to the engine, so that samples of step t + 1 come
from the policy after step t. Server mode writes them to one safetensors file in a folder the server can
read and asks the server to reload from it (`POST /collective_rpc` with `reload_weights`, a development
endpoint: start the server with `VLLM_SERVER_DEV_MODE=1`), then clears its prefix cache (keys and values
computed with the old weights). Colocate mode loads them into the in-process engine's model. LoRA policies
push merged weights (base + scale * B @ A, computed out of place): see `vllm_state_dict`.

Server failures (down, too slow, gone mid-run, a wrong answer) raise `VLLMServerError` naming the URL and
what was being done; nothing falls back to another backend. See docs/vllm.md.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hypo.sampling import Completions

WEIGHTS_FILE = "model.safetensors"
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


class VLLMServerError(RuntimeError):
    """The vLLM server could not be used: the message names its URL and what failed."""


class VLLMSampleError(RuntimeError):
    """vLLM returned samples that are not draws from the policy as asked (wrong stop, length or shape)."""


@dataclass
class WeightPush:
    """One transfer of the policy's weights into the engine."""

    tensors: int
    bytes: int
    write_seconds: float  # state dict -> safetensors file (0 in colocate mode)
    load_seconds: float  # the engine loads them (and drops its prefix cache)

    @property
    def seconds(self) -> float:
        return self.write_seconds + self.load_seconds


# --- requests and answers (no vLLM needed) ------------------------------------------------------------------


def neutral_sampling_params(*, num_generations: int, max_tokens: int, stop_token_ids: list[int]) -> dict[str, Any]:
    """vLLM sampling parameters that draw from softmax(logits) itself, with the sampled tokens' log-probs.

    Each distribution-changing field is set explicitly: a field left out would take the server's default,
    which `--generation-config auto` (vLLM's default) fills from the model's generation_config.json.
    `logprobs=0` returns the log-prob of each sampled token only.
    """
    return dict(
        n=num_generations, max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
        repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0,
        stop_token_ids=list(stop_token_ids), ignore_eos=False, logprobs=0, skip_special_tokens=False,
    )


def completion_request(prompts: list[list[int]], *, model: str, num_generations: int, max_tokens: int,
                       stop_token_ids: list[int]) -> dict[str, Any]:
    """Body of `POST /v1/completions`: token-id prompts in, token ids and their log-probs out."""
    return dict(model=model, prompt=prompts, stream=False, return_token_ids=True, logit_bias=None, bad_words=[],
                allowed_token_ids=None, stop=[],
                **neutral_sampling_params(num_generations=num_generations, max_tokens=max_tokens,
                                          stop_token_ids=stop_token_ids))


def prompt_token_lists(prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[list[int]]:
    """The prompts without their left padding.

    Shape: (G, P) -> G lists
    """
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_input_ids, prompt_attention_mask, strict=True)]


@torch.no_grad()
def per_token_logp_gap(model, samples: Completions) -> tuple[float, float]:
    """Largest and mean |our per-token log-prob - the engine's| over the completion tokens of `samples` (which
    must carry `sampling_per_token_logps`): near float rounding when the engine holds `model`'s weights."""
    from hypo.logprobs import completion_per_token_logps

    ours = completion_per_token_logps(model, samples.prompt_input_ids, samples.prompt_attention_mask,
                                      samples.completion_ids, samples.completion_mask)  # (N, C)
    gap = (ours - samples.sampling_per_token_logps.to(ours.device)).abs() * samples.completion_mask  # (N, C)
    return gap.max().item(), (gap.sum() / samples.completion_mask.sum()).item()


def completions_from_samples(
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    samples: list[tuple[list[int], list[float]]],
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
) -> Completions:
    """`Completions` from sampled token ids and their log-probs, rows [g * k, (g + 1) * k) for prompt g, padded
    to the longest row as `generate_completions` pads them.

    Each row must end at its first stop id, or run `max_new_tokens` tokens without one; anything else (a stop
    id inside a row, a row that ends early on another token, a log-prob per token missing) is a
    `VLLMSampleError`: those samples would not be the policy's.

    Shape: prompts (G, P), G * k samples -> Completions with G * k rows, C = longest sample
    """
    num_prompts = prompt_input_ids.shape[0]
    if len(samples) != num_prompts * num_generations:
        raise VLLMSampleError(f"expected {num_prompts} prompts x {num_generations} samples = "
                              f"{num_prompts * num_generations} completions, got {len(samples)}")
    stop_ids = set(torch.as_tensor(eos_token_id).reshape(-1).tolist())
    for row, (token_ids, logps) in enumerate(samples):
        if not token_ids or len(logps) != len(token_ids):
            raise VLLMSampleError(f"row {row}: {len(token_ids)} tokens with {len(logps)} log-probs")
        stops = [i for i, token in enumerate(token_ids) if token in stop_ids]
        if stops and stops[0] != len(token_ids) - 1:
            raise VLLMSampleError(f"row {row}: stop id {token_ids[stops[0]]} at position {stops[0]} but the sample "
                                  f"goes on to {len(token_ids)} tokens (stop_token_ids ignored?)")
        if not stops and len(token_ids) != max_new_tokens:
            raise VLLMSampleError(
                f"row {row}: ended after {len(token_ids)} tokens on id {token_ids[-1]}, which is no stop id of the "
                f"policy {sorted(stop_ids)} (max {max_new_tokens}): the server's model or its stop ids differ")
        if len(token_ids) > max_new_tokens:
            raise VLLMSampleError(f"row {row}: {len(token_ids)} tokens, more than max_tokens={max_new_tokens}")
    width = max(len(token_ids) for token_ids, _ in samples)
    device = prompt_input_ids.device
    completion_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long, device=device)  # (G * k, C)
    completion_mask = torch.zeros((len(samples), width), dtype=torch.long, device=device)  # (G * k, C)
    sampling_logps = torch.zeros((len(samples), width), dtype=torch.float32, device=device)  # (G * k, C)
    clipped = torch.zeros(len(samples), dtype=torch.bool, device=device)  # (G * k,)
    for row, (token_ids, logps) in enumerate(samples):
        n = len(token_ids)
        completion_ids[row, :n] = torch.tensor(token_ids, dtype=torch.long)
        completion_mask[row, :n] = 1
        sampling_logps[row, :n] = torch.tensor([float("nan") if v is None else v for v in logps])
        clipped[row] = token_ids[-1] not in stop_ids
    if not torch.isfinite(sampling_logps).all():
        raise VLLMSampleError("vLLM returned a missing or non-finite log-prob for a sampled token")
    return Completions(
        prompt_input_ids=prompt_input_ids.repeat_interleave(num_generations, dim=0),
        prompt_attention_mask=prompt_attention_mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids, completion_mask=completion_mask, clipped=clipped,
        sampling_per_token_logps=sampling_logps,
    )


def samples_from_completion_response(response: dict[str, Any], prompts: list[list[int]],
                                     num_generations: int) -> list[tuple[list[int], list[float]]]:
    """(token ids, log-probs) per choice of an OpenAI-style completion answer with `return_token_ids`, in the
    order prompt 0 sample 0..k-1, prompt 1 ...; each choice's prompt must be the one asked for."""
    choices = sorted(response["choices"], key=lambda choice: choice["index"])
    if len(choices) != len(prompts) * num_generations:
        raise VLLMSampleError(f"asked for {len(prompts)} prompts x {num_generations} samples, got {len(choices)} "
                              "completions")
    samples = []
    for i, choice in enumerate(choices):
        prompt = prompts[i // num_generations]
        if choice.get("prompt_token_ids") is not None and list(choice["prompt_token_ids"]) != prompt:
            raise VLLMSampleError(f"completion {i} continues another prompt than prompt {i // num_generations}")
        token_ids = choice.get("token_ids")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if token_ids is None or logprobs is None:
            raise VLLMSampleError(f"completion {i} has no token_ids or no token_logprobs (a vLLM server older than "
                                  "0.10, or not vLLM?)")
        samples.append((list(token_ids), list(logprobs)))
    return samples


# --- weights ------------------------------------------------------------------------------------------------


def merged_lora_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The weights of a LoRA (peft) model with its active adapters merged in, under the base model's names,
    computed out of place: the model itself (and so the reference, its base) is not touched.

    Each adapted weight becomes W + scale * B @ A (peft's `get_delta_weight`); modules_to_save take their
    trained copy. DoRA is refused (its merge also rescales by a magnitude vector).
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    modules = dict(base.named_modules())
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        parts = name.split(".")
        if any(part in LORA_PARTS for part in parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:  # X.modules_to_save.<adapter>.weight -> X.weight
            at = parts.index("modules_to_save")
            parts = parts[:at] + parts[at + 2:]
        merged[".".join(part for part in parts if part != "base_layer")] = tensor.detach()
    for module_name, module in modules.items():
        if not isinstance(module, LoraLayer) or getattr(module, "disable_adapters", False):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if module.use_dora.get(adapter, False):
                raise ValueError(f"{module_name}: DoRA adapters cannot be pushed to vLLM as merged weights here")
            key = f"{module_name}.weight"
            merged[key] = merged[key] + module.get_delta_weight(adapter).to(merged[key].dtype)
    return merged


def vllm_state_dict(model_or_state_dict) -> dict[str, torch.Tensor]:
    """What the engine loads: a state dict as given (e.g. the full weights gathered under sharding), or a
    model's (LoRA merged, see `merged_lora_state_dict`), under Hugging Face names.

    Tied weights are written under every name, the output layer included: vLLM's CPU backend keeps its own
    packed copy of a tied output layer, and a reload that carries only the embedding leaves that copy stale
    (measured with SmolLM2-135M: per-token log-probs 0.5 nats off the updated policy without
    `lm_head.weight` in the file, 4e-5 with it). Where the two share memory the engine loads it twice.
    """
    if isinstance(model_or_state_dict, dict):
        state_dict = model_or_state_dict
    elif hasattr(model_or_state_dict, "get_base_model") and hasattr(model_or_state_dict, "peft_config"):
        state_dict = merged_lora_state_dict(model_or_state_dict)
    else:
        state_dict = model_or_state_dict.state_dict()
    out, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) \
            if tensor.device.type != "meta" else None
        out[name] = tensor.clone() if key in seen else tensor  # safetensors refuses tensors that share memory
        seen.add(key)
    return out


def write_weights(state_dict: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Write `folder/model.safetensors` whole or not at all (a partial file, renamed into place), on the CPU,
    floating tensors cast to `dtype` if given. Returns (tensors, bytes)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.to("cpu").contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{WEIGHTS_FILE}.partial-{os.getpid()}"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / WEIGHTS_FILE)
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def default_weights_dir() -> Path:
    """A new folder for pushed weights: in /dev/shm (memory) when it exists, else the system temp folder."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="hypo-vllm-weights-", dir=root))


# --- server mode --------------------------------------------------------------------------------------------


class VLLMServerClient:
    """A `vllm serve` process reached over HTTP: sampling with `/v1/completions`, weight pushes through a folder
    both processes see.

    `timeout` bounds the wait for the server to come up (`wait_until_ready`) and every request. `weights_dir`
    must be readable by the server under the same path (default: a new folder in /dev/shm, which a server on
    the same machine sees).
    """

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
        result of `hypo.sampling.generate_completions`, at temperature 1 with no truncation: the KL samples).

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
        its prefix cache. Call it on the main process with the full weights, after each optimizer step."""
        start = time.perf_counter()
        tensors, size = write_weights(vllm_state_dict(model_or_state_dict), self.weights_dir, self.weights_dtype)
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


# --- colocate mode ------------------------------------------------------------------------------------------


class VLLMColocate:
    """A vLLM engine in this process (one per training process, on its GPU), as TRL's colocate mode: the
    engine keeps its own copy of the weights, loaded from the policy after each optimizer step.

    `distributed_executor_backend="external_launcher"` keeps the engine in this process (no engine
    subprocess), so weights are handed over as tensors and every training process runs its own engine on its
    own prompts.
    """

    def __init__(self, model_path: str, *, max_model_len: int, gpu_memory_utilization: float = 0.3,
                 seed: int = 0, dtype: str = "auto", **engine_kwargs):
        from vllm import LLM

        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(name, value)  # set by accelerate under `accelerate launch`
        self.llm = LLM(model=model_path, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       seed=seed + int(os.environ["RANK"]), dtype=dtype, generation_config="vllm",
                       logprobs_mode="processed_logprobs", distributed_executor_backend="external_launcher",
                       **engine_kwargs)
        self.max_model_len = max_model_len

    @torch.no_grad()
    def generate(self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, *, num_generations: int,
                 max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int) -> Completions:
        """As `VLLMServerClient.generate`, with the in-process engine."""
        from vllm import SamplingParams

        prompts = prompt_token_lists(prompt_input_ids, prompt_attention_mask)
        stop_ids = torch.as_tensor(eos_token_id).reshape(-1).tolist()
        params = SamplingParams(**neutral_sampling_params(num_generations=num_generations, max_tokens=max_new_tokens,
                                                          stop_token_ids=stop_ids))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = []
        for output in outputs:  # one per prompt, in order
            for sample in sorted(output.outputs, key=lambda s: s.index):
                token_ids = list(sample.token_ids)
                logps = [entry[token].logprob for entry, token in zip(sample.logprobs, token_ids, strict=True)]
                samples.append((token_ids, logps))
        return completions_from_samples(prompt_input_ids, prompt_attention_mask, samples,
                                        num_generations=num_generations, max_new_tokens=max_new_tokens,
                                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def push_weights(self, model_or_state_dict) -> WeightPush:
        """Load the policy's weights into the engine's model, then clear the prefix cache.

        Through the worker's `reload_weights` (in this process: the tensors are passed, not copied to a file),
        which runs the model's `load_weights` (renaming and fusing q/k/v, gate/up) and then redoes each
        layer's post-load processing. TRL calls the driver worker's `model.load_weights` directly, which skips
        that processing: fine where kernels read the weights as loaded (unquantized on CUDA), stale where a
        backend keeps a processed copy (the CPU backend packs every linear layer).
        """
        state_dict = vllm_state_dict(model_or_state_dict)
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state_dict.items()),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        size = sum(t.numel() * t.element_size() for t in state_dict.values())
        return WeightPush(len(state_dict), size, 0.0, time.perf_counter() - start)

    def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def push_policy(accelerator, policy, sampler) -> WeightPush | None:
    """Put the policy's current weights into the vLLM engine; every process calls it (before the first step
    and after each optimizer step), and all wait until the push is done. Returns the push on the processes
    that made one.

    Server mode: the main process pushes (under FSDP2 / ZeRO-3 the full weights are gathered to it first, a
    collective). Colocate mode: each process loads its own engine (unsharded policies only: under sharding
    only the main process holds the full weights, so use server mode there). LoRA policies push merged
    weights (unsharded only).
    """
    from hypo.distributed import full_state_dict, is_sharded

    model = accelerator.unwrap_model(policy)
    sharded = is_sharded(model)
    if sharded and hasattr(model, "peft_config"):
        raise NotImplementedError("vLLM weight pushes of a LoRA policy under FSDP2 / ZeRO-3 (merged weights of a "
                                  "sharded adapter) are not supported; train LoRA unsharded")
    if sharded and not isinstance(sampler, VLLMServerClient):
        raise NotImplementedError("vllm_mode colocate with a sharded policy: only the main process gathers the "
                                  "full weights; use vllm_mode server")
    weights = full_state_dict(accelerator, policy) if sharded else model  # collective when sharded
    push = None
    if accelerator.is_main_process or not isinstance(sampler, VLLMServerClient):
        push = sampler.push_weights(weights)
    accelerator.wait_for_everyone()  # no process samples before the engine holds the new weights
    return push


def make_vllm_sampler(config, model_path: str, *, seed: int | None = None):
    """The vLLM sampler a `HyPOConfig` asks for: a `VLLMServerClient` (checked to be up) or a `VLLMColocate`
    engine on `model_path` (the policy's initial weights; push the current ones before sampling)."""
    if config.vllm_mode == "server":
        client = VLLMServerClient(config.vllm_server_base_url or "http://127.0.0.1:8000",
                                  timeout=config.vllm_server_timeout, weights_dir=config.vllm_server_weights_dir)
        return client.wait_until_ready()
    return VLLMColocate(model_path, max_model_len=config.max_prompt_length + config.max_completion_length,
                        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                        seed=config.seed if seed is None else seed)
