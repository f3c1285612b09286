"""Sharded training on 2 CPU processes (gloo) with FSDP2's `fully_shard`, the sharding accelerate applies
on GPUs: the collective save (full weights gathered to the main process), generation on gathered weights,
the sharded reference with its cache in lock-step, and the collective evaluations give the same model and
evaluation as one unsharded process. A process that skipped a forward of the sharded reference would leave
the other waiting in a collective: the run is killed after `TIMEOUT_S`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_model, free_port
from hypo.config import HyPOConfig

WORKER = Path(__file__).with_name("sharded_worker.py")
PYTHONPATH = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1] / "src"),
                             os.environ.get("PYTHONPATH", "")])  # this checkout's hypo, not an installed one
TIMEOUT_S = int(os.environ.get("HYPO_TEST_TIMEOUT_S", "240"))  # each run takes about 10-20 s on 2 quiet cores


def _run(command: list[str], **env) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **env})
    assert done.returncode == 0, done.stderr[-4000:]


def test_fsdp2_sharded_policy_and_reference_train_save_and_evaluate_like_one_process(tiny_model_dir, tiny_task, tmp_path):
    files = [str(tiny_model_dir), str(tiny_task["pairs"]), str(tiny_task["prompts"]), str(tiny_task["eval_prompts"])]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    _run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), str(tmp_path / "sharded"),
          *files, "sharded"])
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), *files, "single"],
         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "model").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-5, msg=key)
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-3  # training moved the weights
    a = json.loads((tmp_path / "sharded" / "eval_results.json").read_text())["metrics"]
    b = json.loads((tmp_path / "single" / "eval_results.json").read_text())["metrics"]
    assert a["num_completions"] == b["num_completions"] == 4 and a["win_rate"] == b["win_rate"]
    assert abs(a["objective/kl"] - b["objective/kl"]) < 1e-4 and b["objective/kl"] != 0

    ranks = [json.loads((tmp_path / "sharded" / f"rank{i}.json").read_text()) for i in (0, 1)]
    one = json.loads((tmp_path / "single" / "rank0.json").read_text())
    # the reference is sharded: each process holds half of its weights
    assert [r["reference_local_numel"] * 2 for r in ranks] == [one["reference_numel"]] * 2 == \
        [one["reference_local_numel"]] * 2
    # step 1: process 0 had its rows cached, process 1 not: both ran the reference (2 forwards: prompts, then
    # completions); step 3 starts the second epoch: every row is cached on every process, neither ran it
    assert ranks[0]["reference_calls"] == ranks[1]["reference_calls"] == [[2, 2], [2, 2], [0, 2]]
    assert one["reference_calls"] == [[0, 2], [2, 2], [2, 2], [2, 2], [0, 2], [0, 2]]
    # both processes cache all 8 rows, with the values one process computes
    assert ranks[0]["cache"] == ranks[1]["cache"] and ranks[0]["cache"].keys() == one["cache"].keys()
    assert len(one["cache"]) == 8
    for row, values in one["cache"].items():
        torch.testing.assert_close(ranks[0]["cache"][row], values, rtol=0, atol=1e-4)
    for key, value in one["pair_metrics"].items():  # held-out pairs: each process scored half of them
        assert abs(ranks[0]["pair_metrics"][key] - value) < 1e-5 and ranks[1]["pair_metrics"][key] == \
            ranks[0]["pair_metrics"][key], key


def test_a_batch_needs_the_reference_unless_every_row_is_cached():
    from hypo.training.steps import needs_reference_forward

    cache = {3: (-1.0, -2.0), 5: (-3.0, -4.0)}
    assert needs_reference_forward([3, 5], cache) is False
    assert needs_reference_forward([3, 7], cache) is True
    assert needs_reference_forward([3, 5], None) is True  # no cache: always
    assert needs_reference_forward([], {}) is False


def test_any_process_is_the_local_flag_for_one_process():
    from types import SimpleNamespace

    from hypo.runtime.distributed import any_process

    one = SimpleNamespace(num_processes=1)
    assert any_process(one, True) is True and any_process(one, False) is False and any_process(None, True) is True


def test_zero3_inference_config_drops_the_optimizer_and_sizes_buckets_by_the_hidden_size():
    from hypo.runtime.distributed import zero3_inference_config

    train = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
             "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
             "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True}}
    config = zero3_inference_config(train, hidden_size=4096)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 16_777_216,
                                           "stage3_param_persistence_threshold": 40_960,
                                           "stage3_prefetch_bucket_size": 15_099_494}  # 0.9 * 4096**2
    assert config["bf16"] == {"enabled": True} and "optimizer" in train  # the run's config is not changed
    with pytest.raises(ValueError, match="stage 2"):
        zero3_inference_config({"zero_optimization": {"stage": 2}}, hidden_size=64)


def test_an_fsdp1_run_is_told_to_use_fsdp2_for_the_reference(tiny_tokenizer):
    from types import SimpleNamespace

    from accelerate import DistributedType

    from hypo.models.reference import Reference

    fsdp1 = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.FSDP, state=SimpleNamespace())
    with pytest.raises(ValueError, match="--fsdp_version 2"):
        Reference(build_model(tiny_tokenizer)).prepare(fsdp1)


def test_an_fsdp1_run_is_refused_before_any_model_loads(tiny_model_dir, tiny_task, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from accelerate import DistributedType

    import hypo.models.loading
    import hypo.training.setup
    from hypo.config import HyPOConfig
    from hypo.training.trainer import train

    fsdp1 = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.FSDP, state=SimpleNamespace())
    monkeypatch.setattr(hypo.training.setup, "make_accelerator", lambda **kwargs: fsdp1)
    monkeypatch.setattr(hypo.models.loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    config = HyPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(tiny_task["pairs"]),
                        prompts=str(tiny_task["prompts"]), output_dir=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ValueError, match="--fsdp_version 2"):
        train(config)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_deepspeed_gets_the_loops_micro_batch_and_accumulation():
    from hypo.training.backward import deepspeed_batch_settings

    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    assert deepspeed_batch_settings(auto, micro_batch=4, accumulation=4) == \
        {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}
    assert deepspeed_batch_settings({}, micro_batch=2, accumulation=8) == \
        {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8}  # absent: DeepSpeed's default 1
    recipe = json.loads((Path(__file__).parents[1] / "recipes" / "accelerate" / "zero3.json").read_text())
    assert deepspeed_batch_settings(recipe, micro_batch=4, accumulation=4) == {}  # the recipe's own values
    assert deepspeed_batch_settings(recipe, micro_batch=4, accumulation=8) == {"gradient_accumulation_steps": 8}


class StandInEngine:
    """A DeepSpeed engine's calls as the loop makes them, recorded (DeepSpeed itself: tests/test_deepspeed.py)."""

    def __init__(self, stage: int = 3, grad_norm: float = 1.5):
        self.calls, self.stage, self.grad_norm = [], stage, grad_norm

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss, **kwargs):
        self.calls.append(("backward", kwargs))

    def step(self):
        self.calls.append(("step",))

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return False

    def get_global_grad_norm(self):
        return self.grad_norm


def _deepspeed_accelerator(engine):
    from types import SimpleNamespace

    from accelerate import DistributedType

    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1,
                           deepspeed_engine_wrapped=SimpleNamespace(engine=engine))


def test_under_deepspeed_the_last_micro_step_ends_an_accumulation_and_backward_never_steps():
    from hypo.training.backward import backward

    engine = StandInEngine()
    for micro in range(3):
        backward(_deepspeed_accelerator(engine), torch.tensor(1.0), last_micro=micro == 2)
    assert engine.calls == [("boundary", False), ("backward", {"scale_wrt_gas": False}), ("boundary", False),
                            ("backward", {"scale_wrt_gas": False}), ("boundary", True),
                            ("backward", {"scale_wrt_gas": False})]  # the loop divides by the accumulation itself


def test_under_deepspeed_the_engine_steps_only_after_the_non_finite_check(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install hypo[deepspeed])")

    from hypo.training.backward import deepspeed_optimizer_step

    grads = {"value": torch.ones(3)}
    monkeypatch.setattr(deepspeed.utils, "safe_get_local_grad", lambda parameter: grads["value"])  # ZeRO-3's parts
    engine = StandInEngine()
    engine.module = torch.nn.Linear(2, 1)
    accelerator = _deepspeed_accelerator(engine)
    assert deepspeed_optimizer_step(accelerator, torch.ones(2)) == (1.5, None) and engine.calls == [("step",)]
    engine.calls.clear()
    _, problem = deepspeed_optimizer_step(accelerator, torch.tensor([1.0, 0.0]))  # a non-finite online loss
    assert problem == "the online (kl) loss" and engine.calls == []  # the engine did not step
    grads["value"] = torch.tensor([1.0, float("nan"), 0.0])  # finite losses, a non-finite gradient
    _, problem = deepspeed_optimizer_step(accelerator, torch.ones(2))
    assert problem == "the gradient norm" and engine.calls == []


def test_deepspeed_clips_at_max_grad_norm():
    from types import SimpleNamespace

    from accelerate import DistributedType

    from hypo.training.backward import configure_deepspeed

    recipe = json.loads((Path(__file__).parents[1] / "recipes" / "accelerate" / "zero3.json").read_text())
    plugin = SimpleNamespace(deepspeed_config=recipe)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    configure_deepspeed(accelerator, HyPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                                max_grad_norm=0.5))
    assert recipe["gradient_clipping"] == 0.5
    configure_deepspeed(accelerator, HyPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                                max_grad_norm=0))
    assert recipe["gradient_clipping"] == 0.0  # DeepSpeed's "off"


def test_the_zero3_recipe_lets_accelerate_gather_the_weights_it_saves():
    """accelerate's `get_state_dict` (checkpoints, the final model, the vLLM push) refuses a ZeRO-3 model whose
    config does not gather 16-bit weights on save."""
    from accelerate.utils import DeepSpeedPlugin

    path = Path(__file__).parents[1] / "recipes" / "accelerate" / "zero3.json"
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))  # as `accelerate launch --deepspeed_config_file` reads it
    assert plugin.hf_ds_config.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert plugin.zero_stage == 3  # the whole path, trained and saved for real: tests/test_deepspeed.py
