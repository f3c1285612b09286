"""The unchanged training code under `accelerate launch` with 2 CPU processes (gloo data parallel)."""

import json
import os
import subprocess
import sys
from pathlib import Path


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
    env = {**os.environ, "MASTER_PORT": "29533"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]  # written once, by the main process
    assert train_records[0]["loss/dpo"] > 0.69 and "objective/kl" in train_records[0]
    assert (out / "model" / "model.safetensors").is_file()
    assert proc.stdout.count("hypo train (method hypo)") == 1  # one summary
