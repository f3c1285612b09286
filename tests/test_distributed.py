"""The unchanged training code under `accelerate launch` with 2 CPU processes (gloo data parallel); gradient
synchronization and the process group's settings."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port


def test_two_process_training_under_accelerate_launch(tiny_model_dir, tiny_task, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "-m", "hypo.cli", "train", "--model_name_or_path", str(tiny_model_dir),
        "--dataset", str(tiny_task["pairs"]), "--prompts", str(tiny_task["prompts"]),
        "--eval_prompts", str(tiny_task["eval_prompts"]), "--judge", "review-sentiment",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_prompt_batch_size", "2",
        "--max_completion_length", "6", "--eval_max_prompts", "2", "--output_dir", str(out),
    ]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]  # written once, by the main process
    assert train_records[0]["loss/dpo"] > 0.69 and "objective/kl" in train_records[0]
    assert (out / "model" / "model.safetensors").is_file()
    assert proc.stdout.count("hypo train (method hypo)") == 1  # one summary


GENERATION_KEEPS_RESHARD_SETTINGS = r"""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from hypo.runtime.distributed import gathered_for_generation

dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
fully_shard(model[1])
fully_shard(model)


def reshards(module):  # None: weights stay gathered after forward (FSDP2's choice for the root)
    return [g.post_forward_mesh_info is not None for g in module._get_fsdp_state()._fsdp_param_groups]


model(torch.randn(2, 4)).sum().backward()  # the first forward settles the root's setting
before = (reshards(model), reshards(model[1]))
with gathered_for_generation(model):
    model(torch.randn(2, 4))
after = (reshards(model), reshards(model[1]))
model(torch.randn(2, 4)).sum().backward()
print(json.dumps({"before": before, "after": after}), flush=True)
dist.destroy_process_group()
"""


def test_generation_under_fsdp2_puts_back_each_module_s_reshard_setting(tmp_path):
    """The root keeps its weights gathered from forward to backward (FSDP2's default); a generation must not
    leave it resharding after every forward (an extra all-gather of the embeddings per step)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", GENERATION_KEEPS_RESHARD_SETTINGS, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = json.loads(proc.stdout.strip().splitlines()[-1])
    assert settings["before"] == settings["after"] == [[False], [True]]  # root: stays gathered; layer: reshards


def test_fsdp2_reduce_scatters_every_backward_and_ddp_only_the_last():
    """Under FSDP2 a skipped reduce-scatter keeps every micro-step's gradients unsharded on each GPU (16 GB in bf16
    at 8B): every backward reduce-scatters. DDP skips the all-reduce until the last micro-step."""
    from types import SimpleNamespace

    from hypo.training.backward import gradient_sync

    calls = []
    ddp = SimpleNamespace(is_fsdp2=False, no_sync=lambda model: calls.append("no_sync") or contextlib.nullcontext())
    fsdp2 = SimpleNamespace(is_fsdp2=True, no_sync=lambda model: calls.append("no_sync") or contextlib.nullcontext())
    with gradient_sync(fsdp2, "model", sync=False), gradient_sync(fsdp2, "model", sync=True):
        pass
    assert calls == []
    with gradient_sync(ddp, "model", sync=False):
        pass
    with gradient_sync(ddp, "model", sync=True):
        pass
    assert calls == ["no_sync"]


def test_the_process_group_waits_as_long_as_asked_and_ddp_keeps_one_copy_of_the_gradients(tmp_path):
    """The collective timeout (ddp_timeout; NCCL's own default is 10 minutes) is handed to the process group, and
    DDP's gradients are views of its all-reduce buckets."""
    from hypo.runtime.accelerator import make_accelerator

    accelerator = make_accelerator(mixed_precision="no", trackers=[], project_dir=tmp_path, timeout_seconds=3600)
    assert accelerator.init_handler.timeout.total_seconds() == 3600
    assert accelerator.ddp_handler.gradient_as_bucket_view is True
