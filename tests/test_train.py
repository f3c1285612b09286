"""Training loop tests on a tiny Llama: both methods end to end, the identities the loop must keep
(HyPO with kl_coef = 0 is DPO, caching and accumulation change nothing), and the online term's gradient
against the exact reverse KL."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hypo.training.setup
from conftest import build_model
from hypo.config import HyPOConfig
from hypo.models.reference import Reference
from hypo.training.setup import make_optimizer
from hypo.training.steps import StepContext, kl_step
from hypo.training.trainer import train

FAST = {"max_completion_length": 8, "max_length": 64, "max_prompt_length": 32, "per_device_train_batch_size": 2,
        "per_device_prompt_batch_size": 2, "learning_rate": 1e-3, "eval_max_prompts": 2, "eval_batch_size": 2}


def _config(tiny_model_dir, tiny_task, tmp_path, name, **overrides) -> HyPOConfig:
    values = {"model_name_or_path": str(tiny_model_dir), "dataset": str(tiny_task["pairs"]),
              "prompts": str(tiny_task["prompts"]), "eval_prompts": str(tiny_task["eval_prompts"]),
              "judge": "review-sentiment", "max_steps": 2, "output_dir": str(tmp_path / name), **FAST, **overrides}
    return HyPOConfig(**values)


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def _assert_same_weights(a, b, atol=1e-6):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol), key


@pytest.mark.parametrize("method", ["hypo", "dpo"])
def test_train_writes_metrics_model_and_evaluation(tiny_model_dir, tiny_task, tmp_path, method):
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, method, method=method, max_steps=3))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for key in ("loss", "loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "time/step",
                "throughput/tokens_per_second"):
        assert key in train_records[-1], key
    online = ("loss/kl", "objective/kl", "objective/entropy", "completions/mean_length", "completions/clipped_ratio")
    assert all((key in train_records[-1]) == (method == "hypo") for key in online)
    assert train_records[0]["loss/dpo"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
    assert train_records[-1]["rewards/margins"] > 0  # the chosen side gains
    # the saved model loads with transformers and generates
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert saved["method"] == method
    evaluation = json.loads((result.output_dir / "eval_results.json").read_text())["metrics"]
    assert evaluation["num_prompts"] == 2 and evaluation["num_completions"] == 4
    samples = [json.loads(line) for line in (result.output_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4  # the win rate is the mean over prompts of each prompt's mean win
    per_prompt = [sum(s["win"] for s in samples if s["prompt_index"] == i) / 2 for i in (0, 1)]
    assert evaluation["win_rate"] == pytest.approx(sum(per_prompt) / 2)
    assert records[-1]["eval_win_rate"] == evaluation["win_rate"]


def test_checkpoints_and_tensorboard(tiny_model_dir, tiny_task, tmp_path):
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "ckpt", method="dpo", max_steps=3, save_steps=1,
                           report_to="tensorboard", eval_at_end=False))
    for step in (1, 2):
        AutoModelForCausalLM.from_pretrained(result.output_dir / f"checkpoint-{step}")
    assert not (result.output_dir / "checkpoint-3").exists()  # the last step is the final model
    assert list(result.output_dir.rglob("events.out.tfevents.*"))


def test_hypo_with_zero_kl_coef_equals_dpo(tiny_model_dir, tiny_task, tmp_path):
    dpo = train(_config(tiny_model_dir, tiny_task, tmp_path, "dpo", method="dpo", eval_at_end=False))
    hypo = train(_config(tiny_model_dir, tiny_task, tmp_path, "hypo0", method="hypo", kl_coef=0.0, eval_at_end=False))
    _assert_same_weights(dpo.model_dir, hypo.model_dir, atol=0)
    nonzero = train(_config(tiny_model_dir, tiny_task, tmp_path, "hypo1", method="hypo", kl_coef=1.0, eval_at_end=False))
    a, b = _weights(dpo.model_dir), _weights(nonzero.model_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4  # the online term does move the weights


def test_hypo_with_zero_kl_coef_equals_the_offline_run_for_any_loss_type(tiny_model_dir, tiny_task, tmp_path):
    """HyPO for every offline loss: the loop adds kl_coef * loss_kl to whichever offline loss is configured, so with
    a weighted mix of TRL loss types and kl_coef 0 the weights are those of the plain offline run, although the
    online term was sampled and computed (test_hypo_with_zero_kl_coef_equals_dpo: a non-zero kl_coef moves them)."""
    common = {"max_steps": 2, "eval_at_end": False, "loss_type": ["aot_unpaired", "sft"], "loss_weights": [1.0, 0.1]}
    offline = train(_config(tiny_model_dir, tiny_task, tmp_path, "dpo", method="dpo", **common))
    hypo = train(_config(tiny_model_dir, tiny_task, tmp_path, "hypo0", method="hypo", kl_coef=0.0, **common))
    _assert_same_weights(offline.model_dir, hypo.model_dir, atol=0)
    a, b = _weights(offline.model_dir), _weights(tiny_model_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3  # the offline loss moved the weights
    first, second = [json.loads(line) for line in (hypo.output_dir / "metrics.jsonl").read_text().splitlines()[:2]]
    assert second["loss/kl"] != 0 and second["loss"] == second["loss/dpo"]
    # step 1, policy == reference: aot_unpaired is log 2 per pair; sft the mean NLL of the chosen tokens, about
    # log(320) = 5.8 nats for the tiny random model
    assert 0.693147 + 0.1 * 4 < first["loss/dpo"] < 0.693147 + 0.1 * 8


def test_reference_cache_and_gradient_accumulation_change_nothing(tiny_model_dir, tiny_task, tmp_path):
    """One step over the same 4 pairs: cached vs fresh reference log-probs, and 1 x 4 vs 2 x 2 micro-batches."""
    common = {"method": "dpo", "max_steps": 1, "eval_at_end": False}
    plain = train(_config(tiny_model_dir, tiny_task, tmp_path, "a", per_device_train_batch_size=4,
                          precompute_ref_log_probs=False, **common))
    cached = train(_config(tiny_model_dir, tiny_task, tmp_path, "b", per_device_train_batch_size=4, **common))
    accumulated = train(_config(tiny_model_dir, tiny_task, tmp_path, "c", per_device_train_batch_size=2,
                                gradient_accumulation_steps=2, **common))
    _assert_same_weights(plain.model_dir, cached.model_dir, atol=0)
    # Adam's first step is lr * g / (|g| + eps): rounding in near-zero gradients moves single weights by a
    # few 1e-6 at lr 1e-3; an accumulation error would move them by about lr
    _assert_same_weights(plain.model_dir, accumulated.model_dir, atol=1e-5)


def test_shared_prompt_forward_changes_nothing(tiny_model_dir, tiny_task, tmp_path):
    """Two HyPO steps with each prompt run once vs repeated per completion: the same weights."""
    common = {"method": "hypo", "max_steps": 2, "eval_at_end": False}
    shared = train(_config(tiny_model_dir, tiny_task, tmp_path, "shared", **common))
    plain = train(_config(tiny_model_dir, tiny_task, tmp_path, "plain", share_prompt_forward=False, **common))
    _assert_same_weights(shared.model_dir, plain.model_dir, atol=1e-5)
    assert not torch.allclose(_weights(shared.model_dir)["lm_head.weight"], _weights(tiny_model_dir)["lm_head.weight"])


def test_sharing_the_prompt_forward_follows_the_device_unless_set():
    from hypo.training.setup import shares_prompt_forward

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert shares_prompt_forward(HyPOConfig(), cpu) and not shares_prompt_forward(HyPOConfig(), cuda)
    assert shares_prompt_forward(HyPOConfig(share_prompt_forward=True), cuda)
    assert not shares_prompt_forward(HyPOConfig(share_prompt_forward=True, gradient_checkpointing=True), cpu)


def test_lora_uses_base_model_as_reference(tiny_model_dir, tiny_task, tmp_path):
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "lora", use_peft=True, lora_r=4, lora_alpha=8))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss/dpo"] == pytest.approx(0.693147, abs=1e-5)  # adapters start at zero
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert (result.model_dir / "adapter" / "adapter_config.json").is_file()
    merged, base = _weights(result.model_dir), _weights(tiny_model_dir)
    assert merged.keys() == base.keys()
    assert any(not torch.allclose(merged[k], base[k]) for k in base)


def test_kl_step_gradient_matches_exact_reverse_kl(tiny_tokenizer):
    """One-token completions: KL(pi || pi_ref)(x) = sum_v pi(v|x) log(pi(v|x) / pi_ref(v|x)) is exact, and the
    gradient of the sampled surrogate (4000 samples, leave-one-out baseline) must point the same way."""
    policy = build_model(tiny_tokenizer, seed=0, tie_word_embeddings=False)
    ref_model = build_model(tiny_tokenizer, seed=1, tie_word_embeddings=False)
    with torch.no_grad():  # spread the two next-token distributions apart
        policy.lm_head.weight.mul_(20.0)
        ref_model.lm_head.weight.mul_(20.0)
    policy.train()
    ids = torch.tensor([tiny_tokenizer("Write a short review of a cafe.")["input_ids"]])
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": torch.ones_like(ids)}
    config = HyPOConfig(num_generations=4000, max_completion_length=1)

    logp = torch.log_softmax(policy(input_ids=ids).logits[0, -1], dim=-1)
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref_model(input_ids=ids).logits[0, -1], dim=-1)
    exact_kl = (logp.exp() * (logp - ref_logp)).sum()
    exact = torch.autograd.grad(exact_kl, list(policy.parameters()), allow_unused=True)

    torch.manual_seed(0)
    online = kl_step(_context(policy, Reference(ref_model), config, tiny_tokenizer), batch)
    loss, metrics = online.loss, online.metrics
    sampled = torch.autograd.grad(loss, list(policy.parameters()), allow_unused=True)

    def flat(grads):
        return torch.cat([g.flatten() for g in grads if g is not None])

    e, s = flat(exact), flat(sampled)
    cosine = torch.nn.functional.cosine_similarity(e, s, dim=0).item()
    assert cosine > 0.95, cosine
    assert 0.8 < (s.norm() / e.norm()).item() < 1.25
    assert metrics["objective/kl"].item() == pytest.approx(exact_kl.item(), rel=0.15)


def _context(policy, reference, config, tokenizer) -> StepContext:
    return StepContext(policy=policy, sampler=policy, reference=reference, config=config,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       share_prompt=True, ref_cache=None)


def test_one_backward_of_the_summed_loss_changes_nothing(tiny_model_dir, tiny_task, tmp_path, monkeypatch):
    """The loop backpropagates the offline term before it samples (lower peak memory); under DeepSpeed it
    runs one backward of loss_dpo + kl_coef * loss_kl instead. Both must give the same weights after two
    HyPO steps with accumulation (the offline term draws no random numbers, so the samples are the same)."""
    common = {"method": "hypo", "max_steps": 2, "eval_at_end": False, "kl_coef": 0.7, "gradient_accumulation_steps": 2}
    split = train(_config(tiny_model_dir, tiny_task, tmp_path, "split", **common))
    monkeypatch.setattr(hypo.training.setup, "runs_one_backward", lambda accelerator, online: online)
    summed = train(_config(tiny_model_dir, tiny_task, tmp_path, "summed", **common))
    split_log = [json.loads(line) for line in (split.output_dir / "metrics.jsonl").read_text().splitlines()]
    summed_log = [json.loads(line) for line in (summed.output_dir / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(split_log, summed_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"])
    _assert_same_weights(split.model_dir, summed.model_dir, atol=1e-6)
    a, b = _weights(split.model_dir), _weights(tiny_model_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3  # the steps moved the weights


def test_fused_adamw_updates_like_the_default_adamw(tiny_tokenizer):
    models = [build_model(tiny_tokenizer, seed=0) for _ in range(2)]
    config = HyPOConfig(learning_rate=1e-2, weight_decay=0.1)
    fused = make_optimizer(list(models[0].parameters()), config, torch.device("cpu"))
    plain = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    start = dict(build_model(tiny_tokenizer, seed=0).named_parameters())
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert not torch.equal(a, start[name])  # the step moved the weights
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_embedded_default_model_trains_and_evaluates(tmp_path):
    """The real run on the embedded SmolLM2-135M-Instruct and the bundled task, shortened to 2 steps."""
    result = train(HyPOConfig(max_steps=2, eval_max_prompts=4, eval_num_samples=1, output_dir=str(tmp_path / "real")))
    metrics = result.eval["metrics"]
    assert metrics["num_prompts"] == 4 and metrics["num_completions"] == 4
    assert result.final_metrics["completions/mean_length"] > 0
    assert AutoModelForCausalLM.from_pretrained(result.model_dir).config.model_type == "llama"


def test_held_out_pairs_are_evaluated_during_training_and_the_card_is_written(tiny_model_dir, tiny_task, tmp_path):
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "pairs", method="dpo", max_steps=2, eval_steps=1,
                           eval_dataset=str(tiny_task["pairs"]), eval_dataset_split="train"))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    pair_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in pair_records] == [1, 2]  # periodic at 1, final at 2
    assert pair_records[0]["eval_loss"] > pair_records[1]["eval_loss"]  # training on these pairs lowers it
    assert pair_records[1]["eval_rewards/margins"] > 0
    card = (result.model_dir / "README.md").read_text()
    assert "hypo" in card and f"{pair_records[1]['eval_loss']:.3f}"[:4] in card and result.hub_url is None


class _EngineStandIn:
    """What the loop needs of a vLLM sampler: `generate` from the weights it was last given, `push_weights`.
    It records the weights of every sampling call, the thread it ran in, and any push that arrived while a
    call was running (the loop must never change the engine's weights under a request)."""

    pushes_from_main_process = True  # as a server: one process pushes

    def __init__(self, model_dir, *, loads_pushes: bool = True, seconds_per_call: float = 0.0):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.loads_pushes = loads_pushes  # False: an engine that keeps sampling from the initial weights
        self.seconds_per_call = seconds_per_call  # a slow server: a push too early would land inside a call
        self.pushes, self.generated_with, self.threads, self.pushes_during_calls = [], [], [], 0
        self.calling = False

    def push_weights(self, model):
        self.pushes_during_calls += self.calling
        if self.loads_pushes:
            self.model.load_state_dict(model.state_dict())
        self.pushes.append(model.lm_head.weight.detach().clone())

    def generate(self, prompt_input_ids, prompt_attention_mask, **draw):
        import threading
        import time

        from hypo.sampling.generate import generate_completions

        self.calling = True
        try:
            self.threads.append(threading.current_thread().name)
            self.generated_with.append(self.model.lm_head.weight.detach().clone())
            time.sleep(self.seconds_per_call)
            return generate_completions(self.model, prompt_input_ids, prompt_attention_mask, return_logps=True,
                                        **draw)
        finally:
            self.calling = False

    def close(self):
        self.closed = True


def test_with_use_vllm_the_engine_samples_from_the_weights_of_the_latest_step(tiny_model_dir, tiny_task, tmp_path,
                                                                             monkeypatch):
    import hypo.sampling.vllm

    engine = _EngineStandIn(tiny_model_dir)
    monkeypatch.setattr(hypo.sampling.vllm, "make_vllm_sampler", lambda config, path: engine)
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "vllm", method="hypo", max_steps=3, use_vllm=True,
                           vllm_mode="server", eval_at_end=False))
    assert len(engine.pushes) == 4 and len(engine.generated_with) == 3 and engine.closed  # before step 1 + each step
    for pushed, used in zip(engine.pushes, engine.generated_with, strict=False):
        assert torch.equal(pushed, used)  # step t samples with the weights after step t - 1
    assert not torch.equal(engine.pushes[0], engine.pushes[-1])
    torch.testing.assert_close(engine.pushes[-1], _weights(result.model_dir)["lm_head.weight"])
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time/weight_push"] >= 0 for r in records)
    assert max(r["sampler/logp_gap_max"] for r in records) < 1e-4  # the engine's log-probs are our forward's


@pytest.mark.parametrize("overlap", [True, False])
def test_a_vllm_server_overlapping_the_offline_term_samples_from_the_weights_of_the_latest_step(
        tiny_model_dir, tiny_task, tmp_path, monkeypatch, overlap):
    """With `vllm_server_overlap`, each optimizer step's requests (here two per step: steps_per_generation 1 of
    gradient_accumulation_steps 2) go out in a background thread before the offline term, to a slow server;
    each must use the weights pushed after the previous step, and no push may arrive while one is running."""
    import hypo.sampling.vllm

    engine = _EngineStandIn(tiny_model_dir, seconds_per_call=0.2)
    monkeypatch.setattr(hypo.sampling.vllm, "make_vllm_sampler", lambda config, path: engine)
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "overlap", method="hypo", max_steps=3, use_vllm=True,
                           vllm_mode="server", vllm_server_overlap=overlap, gradient_accumulation_steps=2,
                           steps_per_generation=1, eval_at_end=False, learning_rate=1e-2))
    assert len(engine.pushes) == 4 and len(engine.generated_with) == 6 and engine.pushes_during_calls == 0
    assert set(engine.threads) == ({"hypo-sampling"} if overlap else {"MainThread"})
    for call, used in enumerate(engine.generated_with):
        assert torch.equal(engine.pushes[call // 2], used)  # step t samples with the weights after step t - 1
    gaps = [json.loads(line)["sampler/logp_gap_max"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(gaps) < 1e-4  # scored by the policy they were drawn from, though it moves fast (lr 1e-2)


def test_one_sampling_call_per_optimizer_step_draws_from_the_current_weights(tiny_model_dir, tiny_task, tmp_path,
                                                                            monkeypatch):
    """gradient_accumulation_steps 3: one `generate` call per optimizer step with the prompts of all three
    micro-steps; every micro-step's samples are scored (our forward, at the time of its online term) by the
    weights they were drawn from: none changes inside a step, and each step's call sees the previous step's
    update (at lr 1e-2 a sample from older weights shows a gap above 1e-2, test below)."""
    import hypo.training.steps

    calls, real = [], hypo.training.steps.generate_completions

    def with_logps(model, prompt_input_ids, prompt_attention_mask, **kwargs):
        calls.append((prompt_input_ids.shape[0], model.lm_head.weight.detach().clone()))
        return real(model, prompt_input_ids, prompt_attention_mask, return_logps=True, **kwargs)

    monkeypatch.setattr(hypo.training.steps, "generate_completions", with_logps)
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "batched", method="hypo", max_steps=3,
                           gradient_accumulation_steps=3, per_device_train_batch_size=1, learning_rate=1e-2,
                           eval_at_end=False))
    assert [rows for rows, _ in calls] == [6, 6, 6]  # 3 micro-steps x 2 prompts, one call per step
    assert all(not torch.equal(a, b) for (_, a), (_, b) in zip(calls, calls[1:], strict=False))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["sampler/logp_gap_max"] for r in records) < 1e-4


def test_one_sampling_call_per_step_gives_the_losses_and_gradients_of_one_call_per_micro_step(
        tiny_model_dir, tiny_task, tmp_path, monkeypatch):
    """Two HyPO steps of 2 micro-steps: sampled in one call per step, then again with one call per micro-step
    that returns the same samples (each micro-step's rows of the recorded call, cut by hand to its own prompts
    and longest completion): the same losses, gradient norms and weights."""
    import hypo.training.steps

    real, recorded = hypo.training.steps.generate_completions, []

    def recording(model, prompt_input_ids, prompt_attention_mask, **kwargs):
        out = real(model, prompt_input_ids, prompt_attention_mask, **kwargs)
        recorded.append(out)
        return out

    common = {"method": "hypo", "max_steps": 2, "gradient_accumulation_steps": 2, "kl_coef": 1.0,
              "eval_at_end": False}
    monkeypatch.setattr(hypo.training.steps, "generate_completions", recording)
    batched = train(_config(tiny_model_dir, tiny_task, tmp_path, "batched", **common))
    assert [out.completion_ids.shape[0] for out in recorded] == [8, 8]  # 2 micro-steps x 2 prompts x k = 2

    replay = []
    for out in recorded:
        for micro in range(2):
            rows = slice(4 * micro, 4 * micro + 4)
            width = int(out.completion_mask[rows].sum(-1).max())
            replay.append((out.prompt_input_ids[rows], out.prompt_attention_mask[rows], out.completion_ids[rows, :width],
                           out.completion_mask[rows, :width], out.clipped[rows]))

    def replaying(model, prompt_input_ids, prompt_attention_mask, *, num_generations, **kwargs):
        from hypo.sampling.generate import Completions

        ids, mask, completion_ids, completion_mask, clipped = replay.pop(0)
        repeated = prompt_input_ids.repeat_interleave(num_generations, dim=0)
        repeated_mask = prompt_attention_mask.repeat_interleave(num_generations, dim=0)
        assert [r[m.bool()].tolist() for r, m in zip(repeated, repeated_mask, strict=True)] == \
            [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]  # the same prompts, in the same order
        return Completions(repeated, repeated_mask, completion_ids, completion_mask, clipped)

    monkeypatch.setattr(hypo.training.steps, "generate_completions", replaying)
    per_micro_step = train(_config(tiny_model_dir, tiny_task, tmp_path, "per-micro-step", steps_per_generation=1,
                                   **common))
    assert not replay
    logs = [[json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
            for run in (batched, per_micro_step)]
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "loss/kl", "loss/dpo", "objective/kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    _assert_same_weights(batched.model_dir, per_micro_step.model_dir, atol=1e-7)
    a, b = _weights(batched.model_dir), _weights(tiny_model_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4  # the steps moved the weights


def test_an_engine_with_stale_weights_shows_in_the_sampler_logp_gap(tiny_model_dir, tiny_task, tmp_path, monkeypatch):
    import hypo.sampling.vllm

    engine = _EngineStandIn(tiny_model_dir, loads_pushes=False)
    monkeypatch.setattr(hypo.sampling.vllm, "make_vllm_sampler", lambda config, path: engine)
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "stale", method="hypo", max_steps=3, use_vllm=True,
                           vllm_mode="server", eval_at_end=False, learning_rate=1e-2))
    gaps = [json.loads(line)["sampler/logp_gap_mean"]
            for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert gaps[0] < 1e-4 < 1e-2 < gaps[-1]  # step 1 samples the initial weights, which the policy still has


class _EngineThatDies(_EngineStandIn):
    """A server that answers `healthy_calls` sampling requests, then is gone."""

    def __init__(self, model_dir, healthy_calls: int):
        super().__init__(model_dir)
        self.healthy_calls = healthy_calls

    def generate(self, *args, **kwargs):
        from hypo.sampling.vllm.protocol import VLLMServerError

        if len(self.generated_with) == self.healthy_calls:
            raise VLLMServerError("vLLM server http://127.0.0.1:9 (sampling): connection refused")
        return super().generate(*args, **kwargs)


def test_a_vllm_server_lost_mid_run_stops_it_with_its_checkpoints_kept(tiny_model_dir, tiny_task, tmp_path, monkeypatch):
    import hypo.sampling.vllm
    from hypo.sampling.vllm.protocol import VLLMServerError

    monkeypatch.setattr(hypo.sampling.vllm, "make_vllm_sampler", lambda config, path: _EngineThatDies(tiny_model_dir, 3))
    settings = {"method": "hypo", "max_steps": 4, "save_steps": 2, "use_vllm": True, "vllm_mode": "server",
                "eval_at_end": False}
    with pytest.raises(VLLMServerError, match="127.0.0.1:9"):  # no fallback to generate
        train(_config(tiny_model_dir, tiny_task, tmp_path, "lost", **settings))
    run = tmp_path / "lost"
    assert (run / "checkpoint-2").is_dir() and not (run / "model").exists()
    monkeypatch.setattr(hypo.sampling.vllm, "make_vllm_sampler", lambda config, path: _EngineStandIn(tiny_model_dir))
    uninterrupted = train(_config(tiny_model_dir, tiny_task, tmp_path, "whole", **settings))
    resumed = train(_config(tiny_model_dir, tiny_task, tmp_path, "lost", **settings, resume_from_checkpoint="latest"))
    _assert_same_weights(resumed.model_dir, uninterrupted.model_dir)


def test_the_optimizer_never_steps_on_a_non_finite_loss_or_gradient():
    """`optimizer_step` takes no step, advances no schedule and clears the gradient when a loss term or the
    gradient is not finite (and names which); with everything finite it steps."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from hypo.training.trainer import optimizer_step

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), config=SimpleNamespace(max_grad_norm=1.0),
                          trainable=list(layer.parameters()), optimizer=optimizer, scheduler=scheduler)
    before = [p.detach().clone() for p in layer.parameters()]
    cases = ((torch.tensor([1.0, 0.0]), 1.0, "the online (kl) loss"), (torch.tensor([0.0, 1.0]), 1.0, "the offline (dpo) loss"),
             (torch.ones(2), float("nan"), "the gradient norm"))
    for finite, scale, problem in cases:
        layer(torch.ones(1, 3)).sum().mul(scale).backward()
        assert optimizer_step(run, finite)[1] == problem
        assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
        assert all(p.grad is None for p in layer.parameters()) and scheduler.last_epoch == 0
    layer(torch.ones(1, 3)).sum().backward()
    assert optimizer_step(run, torch.ones(2))[1] is None
    assert not torch.equal(before[0], layer.weight) and scheduler.last_epoch == 1
