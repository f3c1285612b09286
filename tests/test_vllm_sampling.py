"""vLLM sampling without vLLM: the request asks for exact policy draws, answers become `Completions` like
generate's, LoRA weights are pushed merged, and a server that is down, slow, broken or gone raises an error
naming its URL (tiny fake servers on 127.0.0.1). The real engine is tested in test_vllm_server.py (slow)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import build_model
from hypo.config import HyPOConfig
from hypo.objective.logprobs import mask_after_eos
from hypo.sampling.vllm import make_vllm_sampler
from hypo.sampling.vllm.colocate import VLLMColocate, free_port
from hypo.sampling.vllm.protocol import (
    VLLMSampleError,
    VLLMServerError,
    completion_request,
    completions_from_samples,
    neutral_sampling_params,
    prompt_token_lists,
    samples_from_completion_response,
)
from hypo.sampling.vllm.server import VLLMServerClient
from hypo.sampling.vllm.weights import merged_lora_state_dict, vllm_state_dict, write_weights

EOS, OTHER_STOP, PAD = 2, 7, 0
PROMPTS = torch.tensor([[PAD, 11, 12], [13, 14, 15]])  # (G=2, P=3) left-padded
PROMPT_MASK = torch.tensor([[0, 1, 1], [1, 1, 1]])
SAMPLES = [([21, EOS], [-0.5, -0.25]),  # prompt 0: stops at EOS
           ([22, 23, 24, 25], [-1.0, -1.0, -1.0, -1.0]),  # prompt 0: clipped at max_new_tokens = 4
           ([OTHER_STOP], [-2.0]),  # prompt 1: stops at the model's second stop id
           ([26, 27, EOS], [-0.1, -0.2, -0.3])]


def _completions(samples=SAMPLES, **kw):
    args = dict(num_generations=2, max_new_tokens=4, eos_token_id=[EOS, OTHER_STOP], pad_token_id=PAD)
    return completions_from_samples(PROMPTS, PROMPT_MASK, samples, **{**args, **kw})


# --- the request ---------------------------------------------------------------------------------------------


def test_request_asks_for_exact_draws_whatever_the_server_defaults():
    """Every field that vLLM would otherwise fill from the model's generation_config.json is set neutral."""
    params = neutral_sampling_params(num_generations=3, max_tokens=64, stop_token_ids=[EOS, OTHER_STOP])
    assert params == dict(n=3, max_tokens=64, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                          presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0, stop_token_ids=[EOS, OTHER_STOP],
                          ignore_eos=False, logprobs=0, skip_special_tokens=False)
    body = completion_request([[11, 12]], model="policy", num_generations=3, max_tokens=64, stop_token_ids=[EOS])
    assert body["prompt"] == [[11, 12]] and body["return_token_ids"] is True and body["stream"] is False
    assert body["logit_bias"] is None and body["bad_words"] == [] and body["stop"] == []
    assert body["allowed_token_ids"] is None


def test_prompts_lose_their_left_padding():
    assert prompt_token_lists(PROMPTS, PROMPT_MASK) == [[11, 12], [13, 14, 15]]


# --- the answer -> Completions ---------------------------------------------------------------------------------


def test_samples_become_completions_shaped_like_generate():
    """Rows [g * k, (g + 1) * k) continue prompt g; padded to the longest row (4) with pad; mask up to and
    including the first stop id; clipped = no stop id; vLLM's log-probs beside, 0 after the stop."""
    out = _completions()
    assert torch.equal(out.prompt_input_ids, PROMPTS.repeat_interleave(2, dim=0))
    assert torch.equal(out.prompt_attention_mask, PROMPT_MASK.repeat_interleave(2, dim=0))
    assert out.completion_ids.tolist() == [[21, EOS, PAD, PAD], [22, 23, 24, 25], [OTHER_STOP, PAD, PAD, PAD],
                                           [26, 27, EOS, PAD]]
    mask, clipped = mask_after_eos(out.completion_ids, [EOS, OTHER_STOP])
    assert torch.equal(out.completion_mask, mask) and torch.equal(out.clipped, clipped)
    assert out.clipped.tolist() == [False, True, False, False]
    assert out.lengths.tolist() == [2, 4, 1, 3]
    assert out.sampling_per_token_logps.tolist() == [[-0.5, -0.25, 0, 0], [-1, -1, -1, -1], [-2, 0, 0, 0],
                                                     pytest.approx([-0.1, -0.2, -0.3, 0])]


@pytest.mark.parametrize("samples, message", [
    (SAMPLES[:3], "expected 2 prompts x 2 samples = 4 completions, got 3"),
    ([([21, EOS, 22], [-1.0] * 3)] + SAMPLES[1:], "stop id 2 at position 1"),
    ([([21, 22], [-1.0, -1.0])] + SAMPLES[1:], "which is no stop id of the policy"),
    ([([21, 22, 23, 24, 25], [-1.0] * 5)] + SAMPLES[1:], "no stop id"),
    ([([21, EOS], [-1.0])] + SAMPLES[1:], "2 tokens with 1 log-probs"),
    ([([21, EOS], [-1.0, None])] + SAMPLES[1:], "non-finite log-prob"),
])
def test_samples_that_are_not_policy_draws_are_refused(samples, message):
    with pytest.raises(VLLMSampleError, match=message):
        _completions(samples)


def _choice(index, prompt, token_ids, logps):
    return {"index": index, "prompt_token_ids": prompt, "token_ids": token_ids,
            "logprobs": {"token_logprobs": logps, "tokens": [str(t) for t in token_ids]}, "finish_reason": "stop"}


def test_choices_are_ordered_by_index_and_checked_against_their_prompt():
    prompts = [[11, 12], [13, 14, 15]]
    choices = [_choice(i, prompts[i // 2], *SAMPLES[i]) for i in range(4)]
    response = {"choices": [choices[2], choices[0], choices[3], choices[1]]}
    assert samples_from_completion_response(response, prompts, 2) == SAMPLES
    choices[3]["prompt_token_ids"] = [11, 12]
    with pytest.raises(VLLMSampleError, match="completion 3 continues another prompt"):
        samples_from_completion_response({"choices": choices}, prompts, 2)


# --- weights ---------------------------------------------------------------------------------------------------


def test_tied_weights_are_written_under_both_names_and_read_back(tmp_path, tiny_tokenizer):
    """vLLM's CPU backend needs lm_head.weight in the file even when tied (see `vllm_state_dict`)."""
    model = build_model(tiny_tokenizer, tie_word_embeddings=True)
    state = vllm_state_dict(model)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # the model stays tied
    tensors, size = write_weights(state, tmp_path)
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "model.safetensors")
    assert tensors == len(loaded) == len(state) and size == sum(t.numel() * 4 for t in loaded.values())
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no partial file left
    write_weights(state, tmp_path, dtype=torch.bfloat16)
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16


def test_untied_output_layer_is_kept(tiny_tokenizer):
    assert "lm_head.weight" in vllm_state_dict(build_model(tiny_tokenizer, tie_word_embeddings=False))


def test_lora_is_pushed_merged_without_touching_the_policy(tiny_tokenizer):
    """A plain model loaded with the merged weights gives the LoRA policy's logits; the policy's own weights
    (and so the reference, its base with adapters off) are unchanged."""
    from hypo.models.loading import add_lora

    policy = add_lora(build_model(tiny_tokenizer, seed=1), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(2)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B = 0 at init: make the adapters matter
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = vllm_state_dict(policy)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    plain = build_model(tiny_tokenizer, seed=5)
    missing, unexpected = plain.load_state_dict(merged, strict=True)
    assert unexpected == missing == []
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected, got = policy(input_ids=ids).logits, plain(input_ids=ids).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapters do change the outputs
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert merged_lora_state_dict(policy).keys() == merged.keys()


def test_merged_lora_weights_stream_one_tensor_at_a_time(tiny_tokenizer):
    """The merged weights of a LoRA model come one tensor at a time: when the consumer takes the next one, the
    merged tensor it dropped is gone (the generator keeps no reference), so the merge costs one weight, not a
    copy of the model. Merged in float32 and cast to the requested dtype, on the requested device."""
    import gc
    import weakref

    from hypo.models.loading import add_lora
    from hypo.models.merging import merged_lora_tensors

    policy = add_lora(build_model(tiny_tokenizer, seed=1), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    made = {t.data_ptr() for t in policy.state_dict().values()}  # live storage (ids of freed views get reused)
    alive, merged_names = [], []
    for name, tensor in merged_lora_tensors(policy, dtype=torch.bfloat16, device="cpu"):
        gc.collect()
        assert sum(ref() is not None for ref in alive) == 0, f"a merged tensor outlived the step before {name}"
        assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
        if tensor.data_ptr() not in made and "proj" in name:
            alive.append(weakref.ref(tensor))
            merged_names.append(name)
        del tensor
    assert len(merged_names) == 2 * 7  # every linear layer of both decoder layers
    expected = merged_lora_state_dict(policy)  # all at once, float32: the same values
    streamed = dict(merged_lora_tensors(policy))
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)


def test_a_push_replaces_the_previous_file_and_a_folder_without_room_is_refused(tmp_path, tiny_tokenizer, monkeypatch):
    """The previous weights file is deleted before the next is written (the folder never holds two), and a
    folder without room (Docker's 64 MB /dev/shm) is refused before anything is written, naming the fix."""
    import shutil as shutil_module

    from hypo.sampling.vllm import weights as weights_module

    model = build_model(tiny_tokenizer)
    write_weights(vllm_state_dict(model), tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    seen_free = []
    real_usage = shutil_module.disk_usage

    def usage(path):
        seen_free.append((tmp_path / "model.safetensors").exists())
        return real_usage(path)

    monkeypatch.setattr(weights_module.shutil, "disk_usage", usage)
    write_weights(vllm_state_dict(model), tmp_path)
    assert seen_free == [False] and (tmp_path / "model.safetensors").stat().st_size == size
    monkeypatch.setattr(weights_module.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=64 * 2**20 // 1000))
    with pytest.raises(ValueError, match="--shm-size"):
        write_weights(vllm_state_dict(model), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


# --- a fake server on 127.0.0.1 -------------------------------------------------------------------------------


class FakeVLLM:
    """Answers like a vLLM server from canned samples; `mode` makes it misbehave."""

    def __init__(self, max_model_len=1024):
        self.mode, self.requests, self.reloads, self.max_model_len = "ok", [], [], max_model_len
        self.reset_failures = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    return self._send(200, {}) if fake.mode != "unhealthy" else self._send(503, {"error": "starting"})
                if self.path == "/v1/models":
                    return self._send(200, {"data": [{"id": "policy", "max_model_len": fake.max_model_len}]})
                if self.path == "/server_info" and fake.mode != "no-dev":
                    return self._send(200, {"vllm_config": "model='m', dtype=torch.bfloat16, max_seq_len=1024"})
                self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                fake.requests.append((self.path, body))
                if fake.mode == "slow":
                    time.sleep(1.5)
                if fake.mode == "hangup":
                    self.close_connection = True
                    self.connection.shutdown(2)  # the process died mid-request: no answer at all
                    return
                if fake.mode == "error":
                    return self._send(500, {"error": "EngineCore died unexpectedly"})
                if self.path == "/v1/completions":
                    prompts, k = body["prompt"], body["n"]
                    choices = [_choice(i, prompts[i // k], *SAMPLES[i % len(SAMPLES)]) for i in range(len(prompts) * k)]
                    return self._send(200, {"choices": choices[::-1]})
                if self.path == "/collective_rpc" and fake.mode != "no-dev":
                    fake.reloads.append(body)
                    assert (Path(body["kwargs"]["weights_path"]) / "model.safetensors").is_file()
                    return self._send(200, {"results": [None]})
                if self.path == "/reset_prefix_cache" and fake.mode != "no-dev":
                    fake.reset_failures -= 1
                    return self._send(200, {"success": fake.reset_failures < 0})
                self._send(404, {"detail": "Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeVLLM()
    yield server
    server.stop()


def _generate(client):
    return client.generate(PROMPTS, PROMPT_MASK, num_generations=2, max_new_tokens=4, eos_token_id=[EOS, OTHER_STOP],
                           pad_token_id=PAD)


def test_client_samples_and_pushes_weights(fake, tmp_path, tiny_tokenizer):
    client = VLLMServerClient(fake.url, timeout=10, weights_dir=tmp_path / "weights").wait_until_ready()
    out = _generate(client)
    assert out.completion_ids.tolist() == _completions().completion_ids.tolist()
    path, body = fake.requests[-1]
    assert path == "/v1/completions" and body["prompt"] == [[11, 12], [13, 14, 15]] and body["model"] == "policy"
    assert body["stop_token_ids"] == [EOS, OTHER_STOP] and body["max_tokens"] == 4 and body["temperature"] == 1.0
    push = client.push_weights(build_model(tiny_tokenizer))
    from safetensors.torch import load_file

    written = load_file(tmp_path / "weights" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}  # the server's dtype: half the bytes
    assert fake.reloads == [{"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "weights")}}]
    assert [p for p, _ in fake.requests[-2:]] == ["/collective_rpc", "/reset_prefix_cache"]
    assert push.tensors > 0 and push.bytes > 0 and push.seconds >= push.write_seconds > 0
    client.close()
    assert (tmp_path / "weights").is_dir()  # a folder the user gave is kept


def test_own_weights_folder_is_made_at_the_first_push_and_removed_on_close(fake):
    client = VLLMServerClient(fake.url, timeout=10)
    assert client._weights_dir is None  # a process that never pushes makes no folder
    client.push_weights({"w": torch.ones(2)})
    folder = client.weights_dir
    assert (folder / "model.safetensors").is_file()
    client.close()
    assert not folder.exists()


def test_server_down_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(VLLMServerError, match=f"vLLM server {url}: .*cannot connect"):
        _generate(VLLMServerClient(url, timeout=2))
    with pytest.raises(VLLMServerError, match=rf"{url} not ready after 1\.5 s"):
        VLLMServerClient(url, timeout=1.5).wait_until_ready()


def test_slow_server_times_out(fake):
    client = VLLMServerClient(fake.url, timeout=5).wait_until_ready()
    client.timeout = 0.5
    fake.mode = "slow"
    with pytest.raises(VLLMServerError, match=rf"{fake.url}: sampling 2 prompts x 2: no answer to POST "
                                              r"/v1/completions within 0\.5 s"):
        _generate(client)


def test_server_that_dies_mid_run(fake, tmp_path):
    client = VLLMServerClient(fake.url, timeout=5, weights_dir=tmp_path).wait_until_ready()
    _generate(client)
    fake.mode = "hangup"  # dies during the request
    with pytest.raises(VLLMServerError, match=f"{fake.url}: sampling .*(connection broke|cannot connect)"):
        _generate(client)
    fake.mode = "error"  # its engine died, the HTTP front still answers
    with pytest.raises(VLLMServerError, match="HTTP 500.*EngineCore died"):
        _generate(client)
    fake.stop()  # gone
    with pytest.raises(VLLMServerError, match=f"{fake.url}: reloading weights .*cannot connect"):
        client.push_weights({"w": torch.ones(2)})


def test_server_without_development_endpoints_is_explained(fake, tmp_path):
    """Refused when connecting (before any training step), and at a push."""
    fake.mode = "no-dev"
    client = VLLMServerClient(fake.url, timeout=5, weights_dir=tmp_path)
    with pytest.raises(VLLMServerError, match="/server_info answered HTTP 404 .*VLLM_SERVER_DEV_MODE=1"):
        client.wait_until_ready()
    with pytest.raises(VLLMServerError, match="/collective_rpc answered HTTP 404 .*VLLM_SERVER_DEV_MODE=1"):
        client.push_weights({"w": torch.ones(2)})


def test_prefix_cache_that_cannot_be_cleared_is_an_error(fake, tmp_path):
    client = VLLMServerClient(fake.url, timeout=5, weights_dir=tmp_path)
    fake.reset_failures = 2
    client.push_weights({"w": torch.ones(2)})  # refused twice, then cleared
    fake.reset_failures = 10
    with pytest.raises(VLLMServerError, match="prefix cache could not be cleared"):
        client.reset_prefix_cache(attempts=2)


def test_server_context_too_short_for_the_run():
    server = FakeVLLM(max_model_len=6)
    try:
        client = VLLMServerClient(server.url, timeout=5).wait_until_ready()
        with pytest.raises(VLLMServerError, match="max_model_len 6 < prompt 3 \\+ completion 4"):
            _generate(client)
    finally:
        server.stop()


def test_config_builds_a_server_client(fake, tmp_path):
    config = HyPOConfig(use_vllm=True, vllm_mode="server", vllm_server_base_url=fake.url + "/",
                        vllm_server_timeout=7.0, vllm_server_weights_dir=str(tmp_path))
    client = make_vllm_sampler(config, "unused")
    assert isinstance(client, VLLMServerClient)
    assert (client.base_url, client.timeout, client.weights_dir, client.model) == (fake.url, 7.0, tmp_path, "policy")


def test_push_policy_main_process_pushes_to_a_server_and_everyone_waits(fake, tmp_path, tiny_tokenizer):
    from hypo.sampling.vllm.weights import push_policy

    waits = []
    policy = build_model(tiny_tokenizer)
    client = VLLMServerClient(fake.url, timeout=5, weights_dir=tmp_path).wait_until_ready()

    def accelerator(main):
        return types.SimpleNamespace(unwrap_model=lambda m: m, is_main_process=main,
                                     wait_for_everyone=lambda: waits.append(main))

    assert push_policy(accelerator(False), policy, client) is None and fake.reloads == []
    push = push_policy(accelerator(True), policy, client)
    assert push.tensors == len(policy.state_dict()) and len(fake.reloads) == 1 and waits == [False, True]


@pytest.mark.parametrize("kwargs, message", [
    (dict(vllm_mode="remote"), "vllm_mode must be one of"),
    (dict(vllm_server_timeout=0.0), "vllm_server_timeout must be > 0"),
    (dict(vllm_gpu_memory_utilization=0.0), "vllm_gpu_memory_utilization must be in"),
    (dict(vllm_server_base_url="127.0.0.1:8000"), "must be an http:// or https:// URL"),
    (dict(use_vllm=True, method="dpo"), "method dpo samples nothing"),
    (dict(use_vllm=True, vllm_server_base_url="http://h:8000"), "are for vllm_mode server"),
])
def test_config_refuses_inconsistent_vllm_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HyPOConfig(**kwargs)


# --- colocate glue, with a stand-in for the vllm package ----------------------------------------------------------


@pytest.fixture(autouse=True)
def _launcher_environment_restored():
    """VLLMColocate sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT where no launcher did; left set, they make
    later tests' `hypo train` processes try to join a process group on a port nobody serves."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_colocate_engine_arguments_outputs_and_weight_loading(monkeypatch, tiny_tokenizer):
    """The engine runs in this process (external_launcher), ignores the model's generation config, reports the
    sampled distribution's log-probs; outputs map to rows as the server's do; weights go to the worker's
    reload_weights as tensors, then the prefix cache is cleared."""
    calls = {}

    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def collective_rpc(self, method, kwargs):
            assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
            calls["loaded"] = dict(kwargs["weights_iterator"])

        def generate(self, prompts, params, use_tqdm):
            calls["generate"] = (prompts, params)
            outputs = []
            for g, _ in enumerate(prompts):
                samples = []
                for j in (1, 0):  # out of order
                    ids, logps = SAMPLES[2 * g + j]
                    samples.append(types.SimpleNamespace(index=j, token_ids=ids, logprobs=[
                        {t: Logprob(lp), 999: Logprob(-9.0)} for t, lp in zip(ids, logps, strict=True)]))
                outputs.append(types.SimpleNamespace(outputs=samples))
            return outputs

        def reset_prefix_cache(self):
            calls["reset"] = True

    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM, fake_vllm.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29999")):  # as under accelerate launch; restored after the test
        monkeypatch.setenv(name, value)
    engine = VLLMColocate("some/model", max_model_len=256, gpu_memory_utilization=0.25, seed=10)
    init = calls["init"]
    assert init["distributed_executor_backend"] == "external_launcher" and init["generation_config"] == "vllm"
    assert init["logprobs_mode"] == "processed_logprobs" and init["seed"] == 13
    assert (init["gpu_memory_utilization"], init["max_model_len"], init["model"]) == (0.25, 256, "some/model")
    out = engine.generate(PROMPTS, PROMPT_MASK, num_generations=2, max_new_tokens=4, eos_token_id=[EOS, OTHER_STOP],
                          pad_token_id=PAD)
    expected = _completions()
    assert torch.equal(out.completion_ids, expected.completion_ids)
    assert torch.equal(out.sampling_per_token_logps, expected.sampling_per_token_logps)
    prompts, params = calls["generate"]
    assert prompts == [{"prompt_token_ids": [11, 12]}, {"prompt_token_ids": [13, 14, 15]}]
    assert params == neutral_sampling_params(num_generations=2, max_tokens=4, stop_token_ids=[EOS, OTHER_STOP])
    model = build_model(tiny_tokenizer)
    push = engine.push_weights(model)
    assert calls["reset"] and calls["loaded"].keys() == vllm_state_dict(model).keys()
    assert push.write_seconds == 0 and push.tensors == len(calls["loaded"])


def test_colocate_sleep_mode_frees_the_engine_between_samplings(monkeypatch, tiny_tokenizer):
    """With sleep mode (TRL's way), the engine sleeps at level 2 after each sampling; a push wakes its weights
    and loads the policy's; a sampling wakes its KV cache; a sampling with the weights asleep and no push since
    (the next micro-step of the same optimizer step) loads the last pushed model again first."""
    events = []

    class LLM:
        def __init__(self, **kwargs):
            events.append(("init", kwargs.get("enable_sleep_mode")))

        def collective_rpc(self, method, kwargs):
            names = [name for name, _ in kwargs["weights_iterator"]]
            events.append(("load", len(names)))

        def generate(self, prompts, params, use_tqdm):
            events.append(("generate",))
            return [types.SimpleNamespace(outputs=[]) for _ in prompts]

        def reset_prefix_cache(self):
            events.append(("reset",))

        def sleep(self, level):
            events.append(("sleep", level))

        def wake_up(self, tags):
            events.append(("wake", tuple(tags)))

    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM, fake_vllm.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setattr("hypo.sampling.vllm.colocate.completions_from_samples", lambda *a, **k: "samples")
    engine = VLLMColocate("some/model", max_model_len=64, enable_sleep_mode=True)
    model = build_model(tiny_tokenizer)
    tensors = len(model.state_dict())
    draw = dict(num_generations=2, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    engine.push_weights(model)  # at set-up, the engine awake
    engine.generate(PROMPTS, PROMPT_MASK, **draw)  # step 1, micro-step 1
    engine.generate(PROMPTS, PROMPT_MASK, **draw)  # micro-step 2: no push between
    engine.push_weights(model)  # after the optimizer step
    engine.generate(PROMPTS, PROMPT_MASK, **draw)
    assert events == [
        ("init", True), ("load", tensors), ("reset",),
        ("generate",), ("sleep", 2),
        ("wake", ("weights",)), ("load", tensors), ("reset",), ("wake", ("kv_cache",)), ("generate",), ("sleep", 2),
        ("wake", ("weights",)), ("load", tensors), ("reset",), ("wake", ("kv_cache",)), ("generate",), ("sleep", 2)]
    events.clear()
    plain = VLLMColocate("some/model", max_model_len=64)  # sleep mode off: the engine never sleeps
    plain.push_weights(model)
    plain.generate(PROMPTS, PROMPT_MASK, **draw)
    assert events == [("init", None), ("load", tensors), ("reset",), ("generate",)]


# --- hypo bench ------------------------------------------------------------------------------------------------


def test_bench_vllm_variant_counts_the_weight_push_in_the_step():
    from hypo.bench.results import markdown, ratios
    from hypo.bench.settings import BenchSettings
    from hypo.bench.variants import variants

    assert variants(BenchSettings(trl=False, fewer_prompts=(), vllm=True)) == [
        "machine", "sampling-by-batch", "dpo", "hypo", "vllm-sampling", "hypo-vllm-server", "hypo-vllm-server-no-overlap"]
    machine = {"params": 1e8, "param_bytes": 4e8, "matmul_flops": 2e11, "copy_bytes_per_second": 1e10,
               "read_bytes_per_second": 1e10, "decode_step_seconds": 0.08, "decode_step_floor_seconds": 0.04,
               "decode_batch": 8, "forward_backward_flops": 1.4e11, "forward_backward_seconds": 1.0,
               "forward_backward_tokens": 1000}
    vllm = {"server": "started here", "weight_bytes": 5.4e8, "time/step": 2.0 + 4.0, "time/weight_push": 2.0,
            "time/weight_push_write": 0.8, "time/weight_push_reload": 1.2, "time/generation": 4.0,
            "time/generation_transformers": 12.0, "logprob_gap_max": 5e-5}
    results = {"machine": machine, "dpo": {"time/step": 3.0, "peak_rss_gb": 4.0},
               "hypo": {"time/step": 9.0, "time/generation": 5.0, "peak_rss_gb": 4.4, "tokens_per_step": 1000,
                        "decode_steps": 64},
               "vllm-sampling": vllm}
    computed = ratios(results)
    assert computed["vllm_vs_transformers_sampling"] == pytest.approx(0.5)  # (2 + 4) / 12
    text = markdown(results, computed, BenchSettings(vllm=True))
    assert "weight push 2.00 s (540 MB: write 0.80 s, reload 1.20 s) + generation 4.00 s = 6.00 s per step" in text
    assert "| vllm-sampling |" not in text


def test_the_checkout_vllm_environment_is_looked_for_at_the_repository_root(monkeypatch, tmp_path):
    """scripts/setup-vllm-cpu.sh makes .venv-vllm at the repository root, beside src/: that is where
    `vllm_python` looks when HYPO_VLLM_PYTHON is not set (the slow vLLM tests skip when it finds nothing)."""
    from hypo.sampling.vllm import process

    root = process.CHECKOUT_VENV_PYTHON.parents[2]
    assert (root / "src" / "hypo" / "sampling" / "vllm" / "process.py").is_file()
    assert (root / "scripts" / "setup-vllm-cpu.sh").is_file()
    monkeypatch.delenv(process.PYTHON_ENV, raising=False)
    assert process.vllm_python() == (process.CHECKOUT_VENV_PYTHON if process.CHECKOUT_VENV_PYTHON.is_file() else None)
    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setenv(process.PYTHON_ENV, str(python))
    assert process.vllm_python() == python
